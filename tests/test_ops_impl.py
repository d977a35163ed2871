"""Fast operator implementations: same parameters and same numbers as the reference GraphConv."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops import channels, family_args, spatial, stride
from torch.utils.flop_counter import FlopCounterMode

from psc_nas.ops import ENV_VAR, EXACT_IMPLS, FastGraphConv, GraphConv, create_op, families, make_spec


def forward_backward(module: torch.nn.Module, x: torch.Tensor, upstream_seed: int) -> tuple[torch.Tensor, ...]:
    x = x.detach().clone().requires_grad_()
    y = module(x)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(upstream_seed))
    y.backward(upstream)
    return (y, x.grad, *(p.grad for p in module.parameters()))


@settings(max_examples=40, deadline=None)
@given(cin=channels, cout=channels, size=spatial, stride=stride, batch=st.integers(1, 2), data=st.data())
def test_every_fast_impl_matches_the_reference_forward_and_gradients(cin, cout, size, stride, batch, data):
    op, args = data.draw(family_args(cin, cout))
    spec = make_spec(op, cin, cout, stride=stride, **args)
    reference = spec.build("reference")
    x = torch.randn(batch, cin, *size)
    expected = forward_backward(reference, x, upstream_seed=cin)
    impls = [i for i in EXACT_IMPLS if i != "reference"] + list(type(spec).impls)
    for impl in impls:
        fast = spec.build(impl)
        assert {k: v.shape for k, v in fast.state_dict().items()} == {
            k: v.shape for k, v in reference.state_dict().items()
        }
        fast.load_state_dict(reference.state_dict())
        got = forward_backward(fast, x, upstream_seed=cin)
        assert len(got) == len(expected)
        for name, a, b in zip(["output", "input grad", *(n for n, _ in fast.named_parameters())], got, expected):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"{impl}: {name} differs by {(a - b).abs().max()}"


def test_fast_impls_return_channels_last_3d():
    # At 2 threads (the machines' default). With torch.set_num_threads(1) oneDNN returns this output in the
    # contiguous format (seen 2026-12-02 under OMP_NUM_THREADS=1): equal values, another memory layout.
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = create_op("pmscn", 4, 6, impl="folded", m=2, n=2)(torch.randn(2, 4, 5, 6, 7))
    finally:
        torch.set_num_threads(threads)
    assert y.is_contiguous(memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("op", sorted(families()))
def test_auto_runs_exactly_the_analytic_macs(op):
    spec = make_spec(op, 8, 8)
    module = spec.build()
    assert module.impl == spec.fast_impl()
    assert type(module) is (GraphConv if module.impl == "reference" else FastGraphConv)
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(1, 8, 5, 5, 5))
    assert counter.get_total_flops() // 2 == spec.cost((5, 5, 5)).macs
    assert sum(p.numel() for p in module.parameters()) == spec.cost((5, 5, 5)).params


@pytest.mark.parametrize(("impl", "executed_over_analytic"), [("masked", 27 / 9), ("planes", 81 / 63)])
def test_cakes_merges_execute_more_macs_than_the_analytic_cost(impl, executed_over_analytic):
    spec = make_spec("cakes", 7, 7)  # uniform allocation: one channel per shape
    with FlopCounterMode(display=False) as counter:
        spec.build(impl)(torch.randn(1, 7, 4, 4, 4))
    assert counter.get_total_flops() // 2 / spec.cost((4, 4, 4)).macs == pytest.approx(executed_over_analytic)


def test_reference_can_be_forced_by_argument_or_environment(monkeypatch):
    assert type(create_op("p3d", 4, 4, impl="reference")) is GraphConv
    monkeypatch.setenv(ENV_VAR, "reference")
    assert type(create_op("p3d", 4, 4)) is GraphConv
    assert type(create_op("p3d", 4, 4, impl="folded")) is FastGraphConv  # an argument beats the variable


@pytest.mark.parametrize(
    ("op", "impl", "message"), [("p3d", "fastest", "impl must be one of"), ("pmscn", "masked", "only applies to cakes")]
)
def test_unknown_or_misapplied_impl_raises(op, impl, message):
    with pytest.raises(ValueError, match=message):
        create_op(op, 4, 4, impl=impl)
