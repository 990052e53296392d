"""mlwf: serverless ML training and inference workflows.

The command line is ``mlwf``; from Python, :class:`mlwf.Engine` runs the
workflows and :func:`mlwf.model.load` loads a published model.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "Engine":
        from mlwf.engine.driver import Engine

        return Engine
    raise AttributeError(name)
