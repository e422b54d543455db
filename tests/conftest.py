import sys
from pathlib import Path

# the tests import the project's top-level modules (uoe, train, ...) from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
