"""Reassemble the answers in request order (items.jsonl already is) into one JSON list."""

import json
import sys

answers = [json.loads(json.loads(line)["output"]) for line in open(sys.argv[1])]
json.dump(answers, sys.stdout, indent=1)
print()
