"""A stand-in model: one molecule in, one JSON prediction out (an Ersilia model's shape)."""

import json
import sys

molecule_id, smiles = sys.argv[1], sys.argv[2]
heavy = sum(ch.isupper() for ch in smiles)
print(json.dumps({"id": molecule_id, "heavy_atoms": heavy,
                  "score": round(heavy / (1 + len(smiles)), 4)}))
