"""Imported once by the local fork server, after scikit-learn: pays the first-call costs
that every worker forked from it would otherwise pay again in its first training call.

Pillow registers its image formats at the first ``Image.open``; scikit-learn's
first PCA and forest fits import and set up more of it (and of SciPy) than
importing the estimators does. Done here on a few random rows, they take about
15 ms once, and a cold ``mlwf run ml-training … 2 8`` spends about 0.4 s less
in its stages: in one session its pca and train stages took 200 and 490 ms
with this module, 320 and 780 ms without (2026-11-28). Nothing here touches
the state a model depends on: every fit of a stage is seeded on its own.
"""

import numpy as np
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.ensemble import ExtraTreesClassifier, RandomForestClassifier


def _warm_up() -> None:
    Image.preinit()
    rows = np.random.default_rng(0).random((40, 16), dtype=np.float32)
    PCA(4, svd_solver="randomized", random_state=0).fit(rows)
    labels = np.arange(40) % 3
    for forest in (RandomForestClassifier, ExtraTreesClassifier):
        forest(n_estimators=2, max_depth=3, n_jobs=1, random_state=0).fit(rows[:, :4], labels)


_warm_up()
