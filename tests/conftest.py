import os

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors, where a test asks for them
# (FusedAdamW(..., triton_on_cpu=True)), so the suite always exercises the real kernels. Triton reads this when a
# kernel is decorated, so it must be set before lisa_kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def pytorch_optimizer_path():
    """For tests of the trainer, not of the kernel: one torch thread (the models are tiny, and on a busy 2-core
    machine OpenMP's second thread made a 4-layer forward 100x slower). FusedAdamW takes its CPU path there (torch's
    fused CPU kernel); the Triton kernel runs on CPU only where a test asks for it with `triton_on_cpu=True`
    (test_adamw.py, test_optimizer.py), since the interpreter costs ~1.5 s a step. On a GPU the kernel runs in
    these tests too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok():
    """The demo's byte-level tokenizer (built locally, no download)."""
    from lisa_trainer.demo import build_demo_tokenizer

    return build_demo_tokenizer()
