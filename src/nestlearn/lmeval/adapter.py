"""``NestlearnLM``: a nestlearn model behind lm-eval's ``LM`` interface.

- ``loglikelihood`` and ``loglikelihood_rolling`` read each input once, in segments of
  ``segment_len`` tokens, carrying the model's state from segment to segment: attention keeps
  its KV cache and recurrent memories (Titans, HOPE) their state, so the log-likelihood of an
  input of any length equals one pass over it (the models stream exactly), with no sliding
  window and no token scored twice.
- Each input starts with the end-of-document id, the way training windows show documents.
- ``generate_until`` generates with ``nestlearn.models.generate`` (greedy unless the task asks
  for ``do_sample``) and cuts the text at the first stop string.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from nestlearn.data.tokenizers import Tokenizer, load_tokenizer
from nestlearn.errors import NestlearnError, check_int, invalid
from nestlearn.models import from_pretrained, generate
from nestlearn.models.lm import CausalLM
from nestlearn.models.state import LMState

DEFAULT_SEGMENT = 512
DEFAULT_MAX_GEN_TOKS = 256


def _load(pretrained: str | os.PathLike[str], tokenizer: str | None
          ) -> tuple[CausalLM, Tokenizer]:
    """A run folder (its latest checkpoint and tokenizer) or a model folder plus a tokenizer."""
    folder = Path(pretrained).expanduser()
    if tokenizer is None:
        from nestlearn.training import load_trained

        model, _, run_tokenizer, _ = load_trained(folder)
        return model, run_tokenizer
    return from_pretrained(folder).eval(), load_tokenizer(tokenizer)


@register_model("nestlearn")
class NestlearnLM(LM):
    """``pretrained``: a ``nestlearn train`` run folder, a nestlearn model folder (then
    ``tokenizer``: the path of its tokenizer.json) or a model; ``segment_len``: tokens read per
    forward pass (memory, not results, depends on it)."""

    def __init__(self, pretrained: str | os.PathLike[str] | CausalLM,
                 tokenizer: str | Tokenizer | None = None, device: str = "cpu",
                 segment_len: int = DEFAULT_SEGMENT, batch_size: int | str = 1,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
        super().__init__()
        if isinstance(pretrained, CausalLM):
            if tokenizer is None or isinstance(tokenizer, str):
                raise invalid("tokenizer", repr(tokenizer), "a Tokenizer with a model object")
            model, loaded = pretrained, tokenizer
        else:
            model, loaded = _load(pretrained, tokenizer if isinstance(tokenizer, str) else None)
            if tokenizer is not None and not isinstance(tokenizer, str):
                loaded = tokenizer
        if model.config.vocab_size != loaded.vocab_size:
            raise invalid("tokenizer", f"vocabulary {loaded.vocab_size}",
                          f"the model's vocabulary {model.config.vocab_size}")
        self.model = model.to(device).eval()
        self.tokenizer = loaded
        self._device = torch.device(device)
        self.segment_len = check_int("segment_len", int(segment_len))
        self.max_gen_toks = check_int("max_gen_toks", int(max_gen_toks))
        # requests are read one at a time (each carries its own state); batch_size is accepted
        # because lm-eval always passes it
        del batch_size

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                               ) -> NestlearnLM:
        from lm_eval.utils import simple_parse_args_string

        args = simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items()
                 if k in ("device", "batch_size") and v is not None}
        return cls(**args, **extra)

    # scoring

    @torch.no_grad()
    def _token_logprobs(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probability of each of ``ids[1:]`` given the tokens before it, and whether it
        is the argmax: one stream over ``ids`` in segments, the state carried."""
        state: LMState | None = None
        logprobs, greedy = [], []
        tokens = torch.tensor([ids], device=self._device)
        for start in range(0, len(ids) - 1, self.segment_len):
            segment = tokens[:, start:start + self.segment_len]
            targets = tokens[0, start + 1:start + 1 + self.segment_len]
            logits, state = self.model(segment, state)
            scores = torch.log_softmax(logits[0, :len(targets)].double(), dim=-1)
            logprobs.append(scores.gather(-1, targets[:, None])[:, 0])
            greedy.append(scores.argmax(-1) == targets)
        return torch.cat(logprobs), torch.cat(greedy)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # as lm-eval's own causal models: trailing spaces move to the continuation, and the
        # continuation is what encoding the whole adds after the context
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context)
        if whole[:len(context_ids)] != context_ids:
            return context_ids, self.tokenizer.encode(continuation)
        return context_ids, whole[len(context_ids):]

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                      ) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            context_ids, continuation_ids = self._encode_pair(context, continuation)
            if not continuation_ids:
                raise NestlearnError(f"lm-eval request: continuation {continuation!r} "
                                     "encodes to no tokens")
            ids = [self.tokenizer.eod_id, *context_ids, *continuation_ids]
            logprobs, greedy = self._token_logprobs(ids)
            count = len(continuation_ids)
            result = (float(logprobs[-count:].sum()), bool(greedy[-count:].all()))
            self.cache_hook.add_partial("loglikelihood", request.args, result)
            results.append(result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            ids = [self.tokenizer.eod_id, *self.tokenizer.encode(text)]
            value = float(self._token_logprobs(ids)[0].sum()) if len(ids) > 1 else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
            results.append(value)
        return results

    # generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            options = dict(gen_kwargs or {})
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(options.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(options.pop("do_sample", False))
            temperature = float(options.pop("temperature", 1.0 if do_sample else 0.0))
            top_k = options.pop("top_k", None)
            seed = options.pop("seed", None)
            if options:
                raise invalid("generation options", sorted(options),
                              "until, max_gen_toks, do_sample, temperature, top_k, seed")
            ids = torch.tensor([[self.tokenizer.eod_id, *self.tokenizer.encode(context)]],
                               device=self._device)
            generator = None
            if seed is not None:
                generator = torch.Generator(device=self._device).manual_seed(int(seed))
            out = generate(self.model, ids, max_new,
                           temperature=temperature if do_sample else 0.0,
                           top_k=None if top_k is None else int(top_k), generator=generator)
            text = self.tokenizer.decode(out[0, ids.shape[1]:].tolist())
            cut = min((text.find(stop) for stop in until if stop and stop in text),
                      default=len(text))
            text = text[:cut]
            self.cache_hook.add_partial("generate_until", request.args, text)
            results.append(text)
        return results


def evaluate_tasks(pretrained: str | os.PathLike[str], tasks: list[str],
                   include_path: str | os.PathLike[str] | None = None,
                   include_defaults: bool = True, tokenizer: str | None = None,
                   limit: int | None = None, bootstrap_iters: int = 100_000,
                   **model_args: Any) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on a nestlearn run or model folder.

    ``include_path``: a folder of task YAML files of your own; ``include_defaults=False``
    skips indexing lm-eval's thousands of built-in tasks; ``bootstrap_iters``: resamples for
    the standard errors (0: none). Returns lm-eval's results dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"pretrained": str(pretrained), **model_args}
    if tokenizer is not None:
        args["tokenizer"] = tokenizer
    manager = TaskManager(include_path=None if include_path is None else str(include_path),
                          include_defaults=include_defaults)
    return lm_eval.simple_evaluate(model="nestlearn", model_args=args, tasks=tasks,
                                   task_manager=manager, limit=limit, log_samples=False,
                                   bootstrap_iters=bootstrap_iters)
