"""Writes the `crosscoder` import stage's fixtures: dictionary_learning-style checkpoints saved by
real torch, from the BatchTopK run in stages/tests/fixtures/crosscoder/reference.safetensors.

Outputs (all float32 weights, all keys `_orig_mod.`-prefixed as a torch.compile'd model saves them):

- stages/tests/fixtures/crosscoder/batchtopk.pt: the final BatchTopK weights (`btk.after.<param>`
  at the last step), `threshold` (last `btk.threshold`), `code_normalization_id` (1, int64),
  `k` (4, int64), and the NormalizableMixin buffers of a model built without normalization
  (`activation_mean`/`activation_std` NaN (2, d), `target_rms` 1.0, `activation_global_scale` 1.0).
- stages/tests/fixtures/crosscoder/dl-checkpoint/: a folder as dictionary_learning's trainSAE
  writes it: `model_final.pt` (the same state dict, but `k` is int32, as
  `BatchTopKCrossCoder.__init__` registers it with `th.tensor(k, dtype=th.int)`) and `config.json`
  (`{"trainer": BatchTopKCrossCoderTrainer.config, "buffer": ...}`).

The state dicts come from `nn.Module.state_dict()` of a module wrapping the crosscoder as
`_orig_mod`, so the pickle has the OrderedDict and `_metadata` of a real checkpoint.

Run: /work/.venv-parity/bin/python scripts/make_crosscoder_pt.py
"""

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "stages/tests/fixtures/crosscoder"


class Linear(torch.nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight = torch.nn.Parameter(weight)
        self.bias = torch.nn.Parameter(bias)


class Crosscoder(torch.nn.Module):
    """Just the state-dict layout of dictionary_learning's BatchTopKCrossCoder."""

    def __init__(self, ref, k_dtype):
        super().__init__()
        last = lambda name: ref[f"btk.after.{name}"][-1].to(torch.float32).contiguous()
        num_layers, d, _ = last("encoder.weight").shape
        # NormalizableMixin buffers first (registered in its __init__, before the submodules).
        self.register_buffer("target_rms", torch.tensor(1.0))
        self.register_buffer("activation_mean", torch.nan * torch.ones(num_layers, d))
        self.register_buffer("activation_std", torch.nan * torch.ones(num_layers, d))
        self.register_buffer("activation_global_scale", torch.tensor(1.0))
        self.encoder = Linear(last("encoder.weight"), last("encoder.bias"))
        self.decoder = Linear(last("decoder.weight"), last("decoder.bias"))
        self.register_buffer("code_normalization_id", torch.tensor(1))
        self.register_buffer("k", torch.tensor(4, dtype=k_dtype))
        threshold = ref["btk.threshold"][-1].item()
        self.register_buffer("threshold", torch.tensor(threshold, dtype=torch.float32))


class Compiled(torch.nn.Module):
    """What torch.compile wraps a module in: its state dict keys get `_orig_mod.`."""

    def __init__(self, inner):
        super().__init__()
        self._orig_mod = inner


def trainer_config():
    return {
        "trainer": {
            "trainer_class": "BatchTopKCrossCoderTrainer",
            "dict_class": "BatchTopKCrossCoder",
            "lr": 0.001,
            "steps": 8,
            "auxk_alpha": 1 / 32,
            "warmup_steps": 3,
            "decay_start": None,
            "threshold_beta": 0.999,
            "threshold_start_step": 2,
            "top_k_aux": 4,
            "seed": 42,
            "activation_dim": 8,
            "dict_size": 32,
            "k": 4,
            "k_target": 4,
            "k_initial": 4,
            "k_annealing_steps": 0,
            "code_normalization": "CodeNormalization.CROSSCODER",
            "code_normalization_alpha_sae": 1.0,
            "code_normalization_alpha_cc": 0.1,
            "device": "cpu",
            "layer": 13,
            "lm_name": "fixture-base-fixture-chat",
            "wandb_name": "fixture-L13-k4-lr1e-03-local-shuffling-CCLoss",
            "submodule_name": None,
            "dict_class_kwargs": {
                "same_init_for_all_layers": "True",
                "norm_init_scale": "1.0",
                "init_with_transpose": "True",
                "encoder_layers": "None",
                "code_normalization": "CodeNormalization.CROSSCODER",
                "code_normalization_alpha_sae": "1.0",
                "code_normalization_alpha_cc": "0.1",
            },
            "target_rms": 1.0,
        },
        "buffer": {"d_submodule": 8, "io": "out", "n_ctxs": 0, "ctx_len": 0},
    }


def main():
    ref = load_file(str(FIXTURES / "reference.safetensors"))
    torch.save(Compiled(Crosscoder(ref, torch.int64)).state_dict(), FIXTURES / "batchtopk.pt")
    folder = FIXTURES / "dl-checkpoint"
    folder.mkdir(exist_ok=True)
    torch.save(Compiled(Crosscoder(ref, torch.int)).state_dict(), folder / "model_final.pt")
    (folder / "config.json").write_text(json.dumps(trainer_config(), indent=4) + "\n")
    sd = torch.load(FIXTURES / "batchtopk.pt", weights_only=True)
    assert math.isclose(sd["_orig_mod.threshold"].item(), ref["btk.threshold"][-1].item(), rel_tol=1e-6)
    for p in sorted(FIXTURES.glob("**/*.pt")):
        print(p.relative_to(ROOT), p.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
