import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
# helpers shared by the test modules (tiny_models.py) import by name under any import mode
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
