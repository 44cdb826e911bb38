import sys
from pathlib import Path


# The project's modules are top-level files in the repository root; make them importable without installation too.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
