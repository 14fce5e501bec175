"""pfadseg.sgd.SGD: torch's SGD update, in place, in each parameter's own layout."""
from __future__ import annotations

import pytest
import torch

from pfadseg.sgd import SGD

CL = torch.channels_last


def _params(layout: torch.memory_format) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    shapes = [(8, 5, 3, 3), (4, 16, 1, 1), (7,), (3, 6)]
    out = []
    for shape in shapes:
        t = torch.randn(shape, generator=gen)
        out.append(torch.nn.Parameter(t.contiguous(memory_format=layout) if t.dim() == 4 else t))
    return out


@pytest.mark.parametrize("param_layout", [CL, torch.contiguous_format])
@pytest.mark.parametrize("grad_layout", [CL, torch.contiguous_format])
def test_sgd_matches_torch_sgd_in_place(param_layout: torch.memory_format,
                                        grad_layout: torch.memory_format) -> None:
    """Three steps (the first makes the momentum buffers) against torch's fused
    SGD on contiguous copies, with two lr groups: bit-equal weights and buffers,
    updated in place, kept in the weight's layout whatever the gradient's."""
    mine, ref = _params(param_layout), _params(param_layout)
    kw = dict(momentum=0.9, weight_decay=1e-4)
    opt = SGD([{"params": mine[:2], "lr": 0.5}, {"params": mine[2:], "lr": 0.05}], lr=0.5, **kw)
    ref = [torch.nn.Parameter(q.detach().contiguous()) for q in ref]
    ref_opt = torch.optim.SGD([{"params": ref[:2], "lr": 0.5}, {"params": ref[2:], "lr": 0.05}],
                              lr=0.5, fused=True, **kw)
    ptrs = [p.data_ptr() for p in mine]
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(mine, ref):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g.contiguous(memory_format=grad_layout) if g.dim() == 4 else g
            q.grad = g
        opt.step()
        ref_opt.step()
    for p, q in zip(mine, ref):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"])
        if p.dim() == 4 and p.shape[-1] > 1:
            assert p.is_contiguous(memory_format=param_layout)
            assert opt.state[p]["momentum_buffer"].stride() == p.stride()
    assert [p.data_ptr() for p in mine] == ptrs


def test_sgd_skips_parameters_without_gradient() -> None:
    """A parameter with no gradient is neither moved nor given a buffer."""
    a, b = _params(CL)[:2]
    before = b.detach().clone()
    a.grad = torch.ones_like(a)
    opt = SGD([a, b], lr=0.1, momentum=0.9, weight_decay=0.0)
    opt.step()
    assert torch.equal(b, before)
    assert "momentum_buffer" not in opt.state[b]
    with pytest.raises(ValueError, match="closure"):
        opt.step(lambda: 0.0)
