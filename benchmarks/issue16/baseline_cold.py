"""Issue 16 (a): the cold one-process baseline, as a script a user would run (process start to exit).

    python benchmarks/issue16/baseline_cold.py FOLDER NUM_PCA NUM_TRAIN

Imports src/mlwf/bench/baseline.py (NumPy, Pillow, scikit-learn) and trains the
same ensemble on the PNG class folders in FOLDER in this one process; prints
one JSON line with the time its imports took and the training took.
"""

import time

T0 = time.time()

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

import importlib.util  # noqa: E402

# mlwf's baseline module alone (NumPy, Pillow, scikit-learn), not the mlwf package around it.
_spec = importlib.util.spec_from_file_location(
    "baseline", os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../src/mlwf/bench/baseline.py"))
baseline = importlib.util.module_from_spec(_spec)
sys.modules["baseline"] = baseline
_spec.loader.exec_module(baseline)

T_IMPORTED = time.time()
result = baseline.train(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
print(json.dumps({"imports_ms": round((T_IMPORTED - T0) * 1e3, 1), "train_ms": round(result["ms"], 1),
                  "validation_accuracy": result["validation_accuracy"], "t_start": T0, "t_end": time.time()}))
