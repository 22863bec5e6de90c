import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)  # subprocess tests (torchrun ranks) share the 2 cores

# the benchmark scripts import as modules in tests (import real_dims, gpu_update)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
