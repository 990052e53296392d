"""Issue 16 (a): the cold one-process baseline, as a script a user would run (process start to exit).

    python benchmarks/issue16/baseline_cold.py FOLDER NUM_PCA NUM_TRAIN

Imports benchmarks/baseline.py (NumPy, Pillow, scikit-learn) and trains the
same ensemble on the PNG class folders in FOLDER in this one process; prints
one JSON line with the time its imports took and the training took.
"""

import time

T0 = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import baseline  # noqa: E402

T_IMPORTED = time.time()
result = baseline.train(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
print(json.dumps({"imports_ms": round((T_IMPORTED - T0) * 1e3, 1), "train_ms": round(result["ms"], 1),
                  "validation_accuracy": result["validation_accuracy"], "t_start": T0, "t_end": time.time()}))
