"""The core: load a model, index its graph, group its coupled channels, cost and check it.

It imports nothing of spa outside itself (tests/test_layout.py)."""

__version__ = "0.1.0"

# process-wide: the CLI sets it, as its process ends with the command (spa.core.runtime.shared_arena)
SHARED_ARENA = False
# process-wide: ONNX Runtime intra-op threads of spa's sessions (0: ONNX Runtime's default, the
# cores); a sweep's worker process sets its share of the cores (spa.core.executor)
THREADS = 0
