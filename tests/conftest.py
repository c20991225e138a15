"""Put the repository root on sys.path so that `import ddil` works under any pytest invocation; fixtures and
helpers that several test files share."""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def one_thread():
    """The tiny UNets gain nothing from threads, and a second thread spin-waits when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_sd_train(argv: list) -> int:
    """sd.train's main in this process on one thread, with accelerate's process-wide state reset afterwards."""
    from accelerate.state import AcceleratorState

    from sd import train
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train.main([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)


def tiny_sd_folder(tmp_path_factory, name: str, prompts: list, header: str = "") -> Path:
    """A folder with the tiny pipeline (sd.tiny, 16 px) in tiny/ and a prompts.txt of `prompts` beside it."""
    from sd import tiny
    d = tmp_path_factory.mktemp(name)
    tiny.save_tiny(d / "tiny")
    (d / "prompts.txt").write_text(header + "\n".join(prompts) + "\n")
    return d
