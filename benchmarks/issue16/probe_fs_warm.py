"""cold_probe.py variant ``warm``: pay in the fork server the first-call costs every worker pays otherwise."""

import numpy as np
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier

from probe_marks import mark

Image.preinit()  # Pillow's common format plugins (imported at the first Image.open otherwise)
_rows = np.random.default_rng(0).random((40, 16), dtype=np.float32)
PCA(4, svd_solver="randomized", random_state=0).fit(_rows)
RandomForestClassifier(n_estimators=2, max_depth=3, n_jobs=1, random_state=0).fit(_rows[:, :4], np.arange(40) % 3)
mark("fork server", "preload warm")
