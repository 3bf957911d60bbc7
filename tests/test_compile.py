"""torch.compile traces flash_attn_varlen_func through the flash_mla custom ops
(fullgraph, aot_eager backend on the CPU) and matches eager mode bit for bit; the
ops' schema, fake kernels and autograd registration pass torch.library.opcheck."""
from __future__ import annotations

import pytest
import torch

import flash_mla
from flash_mla import dense_decode, mha_prefill, sparse_decode, sparse_prefill  # noqa: F401 (register the ops)


def _inputs(seed=0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0, 5, 5, 12], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 8, 16], dtype=torch.int32)
    q = torch.randn(12, 4, 64, generator=g).to(dtype).requires_grad_(True)
    k = torch.randn(16, 2, 64, generator=g).to(dtype).requires_grad_(True)
    v = torch.randn(16, 2, 64, generator=g).to(dtype).requires_grad_(True)
    return q, k, v, cu_q, cu_k


class Block(torch.nn.Module):
    def forward(self, q, k, v, cu_q, cu_k):
        out, lse = flash_mla.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 7, 8, causal=True)
        return out * 2 + 1, lse


def _compiled_then_eager(q, k, v, cu_q, cu_k):
    """Block compiled (aot_eager, fullgraph) and eager on the same leaves, each followed by a
    backward of out.sum(). Returns ((out, lse, grads) compiled, (out, lse) eager); the eager
    gradients are left in q.grad, k.grad, v.grad."""
    torch._dynamo.reset()
    compiled = torch.compile(Block(), backend="aot_eager", fullgraph=True)
    out_c, lse_c = compiled(q, k, v, cu_q, cu_k)
    out_c.float().sum().backward()
    grads_c = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    out_e, lse_e = Block()(q, k, v, cu_q, cu_k)
    out_e.float().sum().backward()
    return (out_c, lse_c, grads_c), (out_e, lse_e)


def test_compile_fullgraph_matches_eager():
    q, k, v, cu_q, cu_k = _inputs()
    (out_c, lse_c, grads_c), (out_e, lse_e) = _compiled_then_eager(q, k, v, cu_q, cu_k)
    assert torch.equal(out_c, out_e)
    assert torch.equal(lse_c, lse_e) and lse_c.stride() == lse_e.stride() == (1, 12)
    for a, t in zip(grads_c, (q, k, v)):
        assert torch.equal(a, t.grad)


def test_compiled_graph_calls_the_custom_op():
    torch._dynamo.reset()
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    q, k, v, cu_q, cu_k = _inputs()
    torch.compile(Block(), backend=backend, fullgraph=True)(q, k, v, cu_q, cu_k)
    assert any("flash_mla.mha_prefill_fwd" in s for s in seen), seen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck_forward_and_backward(dtype):
    q, k, v, cu_q, cu_k = _inputs(dtype=dtype)
    fwd_args = (q, k, v, cu_q, cu_k, 7, 8, 0.125, True, True)
    torch.library.opcheck(torch.ops.flash_mla.mha_prefill_fwd.default, fwd_args + (False,))
    out, lse = mha_prefill._fwd_body(*(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args))
    dout = torch.randn_like(out)
    bwd_args = (dout, q.detach(), k.detach(), v.detach(), out, lse, cu_q, cu_k, 7, 8, 0.125, True, True)
    for deterministic in (False, True):
        torch.library.opcheck(torch.ops.flash_mla.mha_prefill_bwd.default,
                              bwd_args + (deterministic,))


def test_dynamic_shapes_do_not_recompile_per_total_length():
    # Varlen training changes total_q/total_k every step: validation must not
    # specialise the graph to one length.
    torch._dynamo.reset()
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    compiled = torch.compile(Block(), backend=backend, fullgraph=True, dynamic=True)
    for total_q, total_k in ((12, 16), (20, 25), (9, 30)):
        g = torch.Generator().manual_seed(total_q)
        q = torch.randn(total_q, 4, 64, generator=g).to(torch.bfloat16)
        k = torch.randn(total_k, 2, 64, generator=g).to(torch.bfloat16)
        v = torch.randn(total_k, 2, 64, generator=g).to(torch.bfloat16)
        cu_q = torch.tensor([0, 3, 3, total_q], dtype=torch.int32)
        cu_k = torch.tensor([0, 4, 6, total_k], dtype=torch.int32)
        out, lse = compiled(q, k, v, cu_q, cu_k)
        ref_out, ref_lse = Block()(q, k, v, cu_q, cu_k)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert len(compiles) == 1


@pytest.mark.gpu
def test_compile_on_gpu_matches_eager():
    q, k, v, cu_q, cu_k = (t.detach().cuda() for t in _inputs(seed=3))
    for t in (q, k, v):
        t.requires_grad_(True)
    (out_c, lse_c, grads_c), (out_e, lse_e) = _compiled_then_eager(q, k, v, cu_q, cu_k)
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)
    # dk/dv are bit-deterministic; dq may use atomics in the native backward
    for a, t in zip(grads_c[1:], (k, v)):
        assert torch.equal(a, t.grad)
    from flash_mla.testing import check_op_close
    check_op_close("mha_prefill", "dq", grads_c[0], q.grad)


# --------------------------------------------------------------------------- decode, sparse prefill

def _decode_inputs():
    from flash_mla import quant
    g = torch.Generator().manual_seed(11)
    dense = dict(q=torch.randn(2, 2, 4, 576, generator=g).to(torch.bfloat16),
                 k_cache=torch.randn(3, 64, 1, 576, generator=g).to(torch.bfloat16),
                 block_table=torch.tensor([[2, 0], [1, 7]], dtype=torch.int32),
                 cache_seqlens=torch.tensor([100, 20], dtype=torch.int32))
    sparse = dict(q=torch.randn(2, 1, 4, 512, generator=g).to(torch.bfloat16),
                  k_cache=quant.quantize_kv_model1(torch.randn(2, 32, 1, 512, generator=g)),
                  indices=torch.randint(-1, 64, (2, 1, 9), generator=g, dtype=torch.int32),
                  topk_length=torch.tensor([9, 4], dtype=torch.int32),
                  attn_sink=torch.randn(4, generator=g))
    prefill = dict(q=torch.randn(5, 4, 576, generator=g).to(torch.bfloat16),
                   kv=torch.randn(12, 1, 576, generator=g).to(torch.bfloat16),
                   indices=torch.randint(-2, 14, (5, 1, 6), generator=g, dtype=torch.int32))
    return dense, sparse, prefill


def test_opcheck_decode_and_sparse_prefill_ops():
    dense, sparse, prefill = _decode_inputs()
    torch.library.opcheck(torch.ops.flash_mla.dense_decode.default,
                          (dense["q"], dense["k_cache"], dense["block_table"], dense["cache_seqlens"],
                           512, 0.04, True, None, None, False))
    torch.library.opcheck(torch.ops.flash_mla.sparse_decode.default,
                          (sparse["q"], sparse["k_cache"], sparse["indices"], sparse["topk_length"],
                           sparse["attn_sink"], None, None, None, 512, 0.04, "V4", None, False,
                           None, None))
    torch.library.opcheck(torch.ops.flash_mla.sparse_prefill.default,
                          (prefill["q"], prefill["kv"], prefill["indices"], 0.04, 512, None, None))


def test_compile_decode_and_sparse_prefill_fullgraph_match_eager():
    torch._dynamo.reset()
    dense, sparse, prefill = _decode_inputs()

    def step(dense_meta, sparse_meta):
        o1, l1 = flash_mla.flash_mla_with_kvcache(head_dim_v=512, tile_scheduler_metadata=dense_meta,
                                                  causal=True, **dense)
        o2, l2 = flash_mla.flash_mla_with_kvcache(block_table=None, cache_seqlens=None, head_dim_v=512,
                                                  tile_scheduler_metadata=sparse_meta,
                                                  is_fp8_kvcache=True, **sparse)
        o3, m3, l3 = flash_mla.flash_mla_sparse_fwd(sm_scale=0.04, **prefill)
        return o1, l1, o2, l2, o3, m3, l3

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    metas_c = (flash_mla.get_mla_metadata()[0], flash_mla.get_mla_metadata()[0])
    got = compiled(*metas_c)
    got_again = compiled(*metas_c)  # the holders are now initialised: the check path
    metas_e = (flash_mla.get_mla_metadata()[0], flash_mla.get_mla_metadata()[0])
    want = step(*metas_e)
    for a, b, c in zip(got, got_again, want):
        assert torch.equal(a, c) and torch.equal(b, c) and a.stride() == c.stride()
    assert metas_c[0].config == metas_e[0].config and metas_c[1].config == metas_e[1].config
