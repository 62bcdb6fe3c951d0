"""The torchrun process group is closed while the interpreter is whole, after what holds it."""

import gc
import weakref

import torch
import torch.distributed as dist

from gptkit.training.distributed import close_process_group


class _Owner:
    """Stands for a trainer: it sits in a reference cycle, so only the collector frees it."""

    def __init__(self, module):
        self.forward = module
        self.me = self


def test_closing_frees_a_cycle_held_ddp_wrapper_first(tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 2))
        ddp(torch.ones(3, 4)).sum().backward()  # gloo has done work for it
        owner = _Owner(ddp)
        freed = weakref.ref(ddp)
        gc.disable()  # no automatic pass between here and the close
        del owner, ddp
        assert freed() is not None  # reference counts alone do not free it ...
        close_process_group()
        # ... closing collects it before the group goes, so nothing holding gloo's threads is
        # left for interpreter teardown.
        assert freed() is None
        assert not dist.is_initialized()
    finally:
        gc.enable()
        if dist.is_initialized():
            dist.destroy_process_group()
