"""Every stored prediction must be JSON with its own id and a score in [0, 1]."""

import json
import sys

count = 0
for line in open(sys.argv[1]):
    item = json.loads(line)
    assert item["status"] == "success", f"{item['key']}: {item['status']}"
    prediction = json.loads(item["output"])
    assert prediction["id"] == item["key"], f"{item['key']}: answered for {prediction['id']}"
    assert 0.0 <= prediction["score"] <= 1.0, f"{item['key']}: score {prediction['score']}"
    count += 1
print(f"{count} predictions valid")
