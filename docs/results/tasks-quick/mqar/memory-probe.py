"""Why a memory model fails MQAR (run from the repository root with PYTHONPATH=src):
``python memory-probe.py ARCH STEPS SEED [FIELD=VALUE ...]`` trains the same model as
``nestlearn tasks run mqar --quick --steps STEPS --seeds SEED`` and prints JSON.

Looked at: gates by token role, the memory's share of the residual
stream, an ablation of the memory, and how much the memory's read at a query moves when the
queried pair's value (vs another pair's value) is changed."""

import dataclasses
import json
import random
import sys

import torch

from nestlearn.nn.self_modifying import SelfModifyingTitans
from nestlearn.nn.titans import NeuralMemory
from nestlearn.tasks import mqar
from nestlearn.tasks.example import collate
from nestlearn.tasks.models import task_model_configs
from nestlearn.tasks.registry import task_spec
from nestlearn.tasks.training import eval_rng, train_model

arch, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
spec = task_spec("mqar", quick=True)
spec = dataclasses.replace(spec, budget=dataclasses.replace(spec.budget, steps=steps))
config = task_model_configs([arch], spec.vocab_size, sys.argv[4:])[arch]
model, losses = train_model(spec, config, seed, spec.budget)
model.eval()
examples = spec.eval_examples(eval_rng(spec))
vocab = mqar.MQARVocab()
layers = [m for m in model.modules() if isinstance(m, (NeuralMemory, SelfModifyingTitans))]
out = {
    "arch": arch,
    "steps": steps,
    "seed": seed,
    "sets": sys.argv[4:],
    "final_loss": sum(losses[-40:]) / 40,
}

state = {"ablate": False, "capture": None, "inputs": None}


def hook(i):
    def f(module, args, output):
        y, st = output
        x = args[0]
        if state["capture"] is not None:
            state["capture"][i] = (x.detach(), y.detach())
        if state["ablate"]:
            return torch.zeros_like(y), st
        return output

    return f


for i, l in enumerate(layers):
    l.register_forward_hook(hook(i))


@torch.no_grad()
def accuracy(exs):
    right = total = 0
    for s in range(0, len(exs), 16):
        b = collate(exs[s : s + 16], spec.pad_id)
        logits, _ = model(b.inputs)
        m = b.targets != -100
        right += (logits.argmax(-1)[m] == b.targets[m]).sum().item()
        total += m.sum().item()
    return right / total


out["accuracy"] = accuracy(examples)
state["ablate"] = True
out["accuracy_memory_zeroed"] = accuracy(examples)
state["ablate"] = False


# gates by role, memory output share, per layer
@torch.no_grad()
def gates_of(layer, x):
    if isinstance(layer, NeuralMemory):
        alpha, eta, theta = layer.gate_values(x)
        return eta / layer.config.resolved_eta_max, theta, 1 - alpha, layer.config.resolved_eta_max
    inputs, _, _ = layer.memory_inputs(x, layer.init_state(x.shape[0]))
    c = layer.config
    return inputs.eta / c.resolved_eta_max, inputs.theta, 1 - inputs.alpha, c.resolved_eta_max


sums = [dict() for _ in layers]
share = [[0.0, 0] for _ in layers]
for ex in examples:
    toks = torch.tensor([ex.tokens[:-1]])
    state["capture"] = {}
    with torch.no_grad():
        model(toks)
    n_ctx = len(ex.tokens) - 2 * len(ex.answers)
    role = (
        ["bos"]
        + ["key" if i % 2 == 1 else "value" for i in range(1, n_ctx)]
        + ["query" if i % 2 == 0 else "answer" for i in range(len(ex.tokens) - 1 - n_ctx)]
    )
    for i, l in enumerate(layers):
        x, y = state["capture"][i]
        f, th, fo, emax = gates_of(l, x)
        for r in ("key", "value", "query"):
            idx = torch.tensor([j for j, rr in enumerate(role) if rr == r])
            d = sums[i].setdefault(r, [0.0, 0.0, 0.0, 0])
            d[0] += f[0, idx].mean().item()
            d[1] += th[0, idx].mean().item()
            d[2] += fo[0, idx].mean().item()
            d[3] += 1
        qidx = torch.tensor([a - 1 for a in ex.answers])
        share[i][0] += (y[0, qidx].norm(dim=-1) / x[0, qidx].norm(dim=-1)).mean().item()
        share[i][1] += 1
        sums[i]["eta_max"] = emax
out["layers"] = []
for i in range(len(layers)):
    entry = {
        "layer": i,
        "eta_max": sums[i]["eta_max"],
        "memory_output_over_input_norm_at_queries": share[i][0] / share[i][1],
    }
    for r in ("key", "value", "query"):
        d = sums[i][r]
        entry[r] = {"eta_fraction": d[0] / d[3], "theta": d[1] / d[3], "forget": d[2] / d[3]}
    th = entry["value"]["theta"]
    ef = entry["value"]["eta_fraction"]
    # one-shot write at a value token, as a share of the cap's 1/chunk (MEMORY_LAYERS, Stability)
    entry["one_shot_write_vs_cap"] = ef * (1 - 0.9) / (1 - th)
    out["layers"].append(entry)

# value-swap sensitivity at the query of pair j: change v_j (queried) or v_other
rng = random.Random(0)
sens = [[0.0, 0.0, 0] for _ in layers]
logit_sens = [0.0, 0.0]
for ex in examples:
    toks = list(ex.tokens)
    a = ex.answers[0]
    qtok = toks[a - 1]
    n_ctx = len(toks) - 2 * len(ex.answers)
    kpos = [p for p in range(1, n_ctx, 2)]
    kq = next(p for p in kpos if toks[p] == qtok)
    other = rng.choice([p for p in kpos if p != kq]) if len(kpos) > 1 else None
    if other is None:
        continue

    def run(t, a=a):
        state["capture"] = {}
        with torch.no_grad():
            logits, _ = model(torch.tensor([t[:a]]))
        return {i: state["capture"][i][1][0, a - 1] for i in state["capture"]}, logits[0, a - 1]

    base, lb = run(toks)
    results = []
    for p in (kq + 1, other + 1):
        t2 = list(toks)
        t2[p] = vocab.value(
            (toks[p] - 2 - vocab.keys + 1 + rng.randrange(vocab.values - 1)) % vocab.values
        )
        results.append(run(t2))
    for i in range(len(layers)):
        n = base[i].norm().item() + 1e-12
        sens[i][0] += (results[0][0][i] - base[i]).norm().item() / n
        sens[i][1] += (results[1][0][i] - base[i]).norm().item() / n
        sens[i][2] += 1
    nl = lb.norm().item()
    logit_sens[0] += (results[0][1] - lb).norm().item() / nl
    logit_sens[1] += (results[1][1] - lb).norm().item() / nl
for i, e in enumerate(out["layers"]):
    e["read_change_queried_value"] = sens[i][0] / sens[i][2]
    e["read_change_other_value"] = sens[i][1] / sens[i][2]
out["logit_change_queried_value"] = logit_sens[0] / sens[0][2]
out["logit_change_other_value"] = logit_sens[1] / sens[0][2]
print(json.dumps(out, indent=1))
