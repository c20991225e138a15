"""Put the repository root on sys.path so that `import ddil` works under any pytest invocation."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
