"""A stand-in predictor: one record in, one JSON answer out (like one of GAME's predictors)."""

import json
import sys

record_id, species, sequence = sys.argv[1:4]
gc = sum(base in "GC" for base in sequence) / max(1, len(sequence))
print(json.dumps({"id": record_id, "gc": round(gc, 4), "length": len(sequence),
                  "species_actual": species, "type_actual": "dna"}))
