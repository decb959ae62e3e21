"""Teacher model at scale, single process: a bf16 dense module takes the fp32 embedding outputs and batch features
(one cast at its entry) and returns fp32 logits; activation checkpointing changes no value and no gradient."""

import copy

import pytest
import torch
from helpers import SCHEMA, make_batch

from recdistill.config import TeacherConfig
from recdistill.distill.losses import task_loss
from recdistill.models.teacher import TeacherModel
from recdistill.models.tokenmixer import TokenMixerBlock

CFG = dict(history_len=20, merge_k=3, recent_k=4, d_model=16, num_tokens=4, longer_dim=8, emb_dim=4,
           longer_layers=2, num_layers=2, embedding_backend="torch")
KINDS = {"ctr": "binary", "watch_time": "continuous"}


def test_precision_auto_is_bf16_on_cuda_only():
    assert TeacherConfig(precision="auto").compute_dtype(cuda=True) == torch.bfloat16
    assert TeacherConfig(precision="auto").compute_dtype(cuda=False) == torch.float32
    assert TeacherConfig(precision="bf16").compute_dtype(cuda=False) == torch.bfloat16
    assert TeacherConfig(precision="fp32").compute_dtype(cuda=True) == torch.float32


def test_bf16_dense_module_takes_fp32_inputs_and_returns_fp32_logits():
    """DeepSpeed's bf16 mode casts the module it wraps (model.dense) to bf16 and nothing else: before the cast at
    the dense module's entry this forward raised 'mat1 and mat2 must have the same dtype'."""
    torch.manual_seed(0)
    ref = TeacherModel(SCHEMA, TeacherConfig(**CFG))
    model = copy.deepcopy(ref)
    model.dense.bfloat16()
    batch = make_batch(n=16, seed=3)
    out = model(batch)
    assert all(v.dtype == torch.float32 for v in out.values())
    task_loss(out, batch.labels, KINDS).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.embed.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in model.dense.parameters())
    want = ref(batch)
    for t in KINDS:
        # bf16 keeps 8 significant bits (relative rounding 2^-9 per op); through a dozen layers of this tiny model
        # the logits (|z| ~ 0.1-1) drift by a few 1e-3. 3e-2 absolute leaves room without accepting a wrong model.
        torch.testing.assert_close(out[t], want[t].detach(), atol=3e-2, rtol=0, msg=f"task {t}")


def count_block_calls(model: TeacherModel) -> list[int]:
    """Forward calls of each TokenMixer block and each LONGER layer's attention, counted as they happen."""
    calls = []
    longer = model.dense.longer
    for block in [*model.dense.mixer.blocks, longer.cross, *longer.self_attn]:
        calls.append(0)
        i = len(calls) - 1
        # a pre-hook: the recomputation in backward stops early, once it has what backward needs, so a forward
        # (post) hook would not see it
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("extra", [{}, {"moe_experts": 2, "moe_topk": 1}])
def test_activation_checkpointing_gives_identical_gradients(extra):
    torch.manual_seed(0)
    plain = TeacherModel(SCHEMA, TeacherConfig(**CFG, **extra))
    ckpt = TeacherModel(SCHEMA, TeacherConfig(**CFG, **extra, activation_checkpointing="block"))
    ckpt.load_state_dict(plain.state_dict())
    calls = count_block_calls(ckpt)
    batch = make_batch(n=12, seed=4)
    grads = []
    for model in (plain, ckpt):
        out = model(batch)
        task_loss(out, batch.labels, KINDS).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    # every block and LONGER layer ran twice: forward, then again in backward (so checkpointing really was on)
    assert calls == [2] * (len(ckpt.dense.mixer.blocks) + 2) and isinstance(ckpt.dense.mixer.blocks[0], TokenMixerBlock)
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        assert g is not None, name
        # the recomputation repeats the same ops on the same inputs: bit-identical, not merely close
        torch.testing.assert_close(grads[1][name], g, atol=0, rtol=0, msg=f"gradient of {name}")


def test_activation_checkpointing_is_off_without_gradients():
    torch.manual_seed(0)
    model = TeacherModel(SCHEMA, TeacherConfig(**CFG, activation_checkpointing="block"))
    calls = count_block_calls(model)
    with torch.no_grad():
        model(make_batch(n=4))
    assert calls == [1] * len(calls)
