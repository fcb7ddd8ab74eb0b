"""Put the repository root on sys.path so tests can `import model`, `import tokenizer`, ..."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
