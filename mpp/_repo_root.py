"""Run as a file (`python mpp/pretrain.py`, `accelerate launch mpp/pretrain.py`), a stage script has mpp/ itself
first on sys.path, where Python puts the script's folder. A script imports this module first in that case (found
there, as a top-level module): it puts the repository root in mpp/'s place, so that `import mpp` finds this
checkout's package and mpp/'s own modules (data, models, ...) cannot shadow top-level ones of the same name.
Run as a module (`python -m mpp.pretrain`, `accelerate launch -m mpp.pretrain`), nothing needs doing.
"""
import sys
from pathlib import Path

_MPP = Path(__file__).resolve().parent

if sys.path and Path(sys.path[0] or ".").resolve() == _MPP:
    sys.path[0] = str(_MPP.parent)
