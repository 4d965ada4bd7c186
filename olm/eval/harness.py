"""olm's model type for EleutherAI's lm-evaluation-harness: ``lm_eval --model olm --model_args path=<run dir>``.

``OlmLM`` scores with olm's own model and KV cache, never through a Hugging Face conversion, so a run is evaluated
exactly as it was trained (its tokenizer included). It follows lm-eval's ``hf`` model wherever the two could
differ, so that the same weights give the same log-likelihoods under both (tests/test_eval.py): an empty context
is conditioned on the end-of-text token; a context and continuation longer than the model's window keep their last
``max_length + 1`` tokens (a continuation longer than the window is scored on its last ``max_length`` tokens,
where lm-eval's hf model stops with an assertion); trailing spaces of a context move to its continuation (lm-eval's ``TemplateLM``).

Batching: log-likelihood requests are sorted by length (longest first) and right-padded, which a causal model
never sees; requests that share a context and differ only in a one-token continuation are scored once.
Generation batches requests whose contexts have the same token length (olm's model takes no padding mask) and
runs greedy or sampled decoding on the KV cache, stopping each row at its first stop sequence.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
from tqdm import tqdm

from olm.errors import ConfigError

log = logging.getLogger(__name__)

NEWLINE = 10  # the byte tokenizer's "\n": documents are joined with "\n\n", so a document follows a newline
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _dtype(name: str, device: torch.device) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype={name!r} is not known; known: {', '.join(DTYPES)}")
    if DTYPES[name] is not None:
        return DTYPES[name]
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.bfloat16 if cuda_bf16 else torch.float32


@register_model("olm")
class OlmLM(TemplateLM):
    """An olm model in lm-eval. ``path`` is a run dir, an exported model dir or a Lightning ``.ckpt`` file;
    ``model`` and ``tokenizer`` pass a live model instead (the in-loop evaluation). ``dtype``: auto (bfloat16 on a
    GPU that has it, float32 otherwise), float32, bfloat16, float16."""

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "OlmLM":
        """``lm_eval --model olm --model_args ...``: lm-eval adds its own ``--device`` and ``--batch_size`` to the
        model args; a key given in ``--model_args`` too is the model's own choice and wins (lm-eval's base class
        would pass it twice, a TypeError)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "OlmLM":
        from lm_eval import utils

        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    def __init__(self, path: str | None = None, *, model=None, tokenizer=None, device: str | None = None,
                 batch_size: int | str = 16, dtype: str = "auto", max_length: int | None = None,
                 max_gen_toks: int = 256, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            unknown = ", ".join(sorted(kwargs))
            raise ConfigError(f"--model_args {unknown}: not known to the olm model; known: path, device, "
                              "batch_size, dtype, max_length, max_gen_toks")
        if model is None:
            if path is None:
                raise ConfigError("--model_args path=... is required: a run dir, a model dir or a .ckpt file")
            from olm.checkpoint import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(str(path), require_tokenizer=True)
        if tokenizer is None:
            raise ConfigError("the olm model needs its tokenizer; pass tokenizer= with model=")
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s: no CUDA device here; evaluating on the CPU", device)  # lm_eval's default
            device = "cpu"
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._live = path is None  # a training model: give it back as it was (device, dtype, mode)
        if not self._live:
            model = model.to(self._device, _dtype(dtype, self._device))
        self.model, self.tokenizer = model, tokenizer
        if str(batch_size).startswith("auto"):  # lm-eval's hf model probes for the largest batch; olm does not
            log.warning("batch_size=%s: olm scores fixed batches; using 16 (set batch_size=N)", batch_size)
            batch_size = 16
        self._batch_size = int(batch_size)
        if self._batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        self._max_length = int(max_length or model.max_seq_len)
        self._max_gen_toks = int(max_gen_toks)
        self._autocast = self._live and self._device.type == "cuda"

    # -- what lm-eval asks of a model ----------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        return NEWLINE if eos is None else eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode([tokens] if isinstance(tokens, int) else tokens)

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": str(self._param_dtype())}

    # -- scoring -------------------------------------------------------------------------------------------------
    def _param_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def _logits(self, tokens: torch.Tensor, cache=None) -> torch.Tensor:
        """(B, T) -> (B, T, vocab) log-probabilities in float32; the model's padding rows dropped."""
        with torch.autocast("cuda", torch.bfloat16, enabled=self._autocast):
            logits = self.model(tokens, cache)
        return F.log_softmax(logits[..., : self.model.vocab_size].float(), dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """[(strings, context ids, continuation ids)] -> [(log-likelihood, is greedy)], in request order."""

        def longest_first(request):
            tokens = request[1] + request[2]
            return -len(tokens), tuple(tokens)

        def shared_prefix(request):  # requests equal but for their last continuation token share one forward
            return request[1] + request[2][:-1]

        order = Collator(requests, sort_fn=longest_first, group_by="contexts", group_fn=shared_prefix)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self._live or self.rank != 0,
                   desc="olm: loglikelihood")
        was_training = self.model.training
        self.model.eval()
        try:
            for chunk in order.get_batched(n=override_bs or self.batch_size):
                inputs, spans = [], []
                for _, context, continuation in chunk:
                    window = (context + continuation)[-(self.max_length + 1):][:-1]  # (T,) as lm-eval's hf model
                    inputs.append(window)
                    spans.append((len(window), continuation))
                width = max(len(row) for row in inputs)
                batch = torch.zeros(len(inputs), width, dtype=torch.long)
                for row, window in enumerate(inputs):
                    batch[row, : len(window)] = torch.tensor(window)  # right padding: unseen by earlier positions
                logprobs = self._logits(batch.to(self._device))  # (B, width, V)
                for request, row_logprobs, (length, continuation) in zip(chunk, logprobs, spans):
                    # A continuation longer than the window: only its last `length` tokens can be scored.
                    start = max(length - len(continuation), 0)
                    row_logprobs = row_logprobs[start:length]  # (scored continuation tokens, V)
                    for req, cont, rows in order.get_cache(req_str=request[0], cxt_toks=request[1],
                                                           cont_toks=request[2], logits=row_logprobs[None]):
                        # Requests of one group may split the same tokens at different points: each keeps
                        # the trailing rows that predict its own continuation.
                        n = min(len(cont), rows.shape[1])
                        rows, target = rows[0, -n:], torch.tensor(cont[-n:], device=rows.device)
                        greedy = bool((rows.argmax(-1) == target).all())
                        score = float(rows.gather(-1, target[:, None]).sum())
                        results.append((score, greedy))
                        if req is not None:
                            self.cache_hook.add_partial("loglikelihood", req, (score, greedy))
                        bar.update(1)
        finally:
            self.model.train(was_training)
            bar.close()
        return order.get_original(results)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-text log-likelihoods: disjoint windows of the model's length, each conditioned on the one token
        before it (the end-of-text token for the first), as lm-eval's hf model does."""
        from lm_eval import utils

        windows, owners = [], []
        for index, (text,) in enumerate(request.args for request in requests):
            rolling = utils.get_rolling_token_windows(token_list=self.tok_encode(text), prefix_token=self.eot_token_id,
                                                      max_seq_len=self.max_length, context_len=1)
            for context, continuation in map(utils.make_disjoint_window, rolling):
                windows.append((None, context, continuation))  # no strings: not cached
                owners.append(index)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (score, _) in zip(owners, scores):
            totals[index] += score
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (request.args[0],), total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from olm.generate import generate

        def longest_first(request):
            return -len(self.tok_encode(request[0])), request[0]

        order = Collator([r.args for r in requests], sort_fn=longest_first, group_by="gen_kwargs",
                         group_fn=lambda request: request[1])
        eos = None if self.tokenizer.eos_id is None else self.tok_decode(self.tokenizer.eos_id)
        results = []
        bar = tqdm(total=len(requests), disable=disable_tqdm or self._live or self.rank != 0,
                   desc="olm: generate_until")
        for chunk in order.get_batched(n=self.batch_size):
            kwargs = normalize_gen_kwargs(dict(chunk[0][1]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ConfigError(f"max_gen_toks={max_new} must be below the model's length ({self.max_length})")
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            contexts = [self.tok_encode(context)[-(self.max_length - max_new):] for context, _ in chunk]
            # Rows of one forward pass need one length (no padding mask): split the chunk where lengths change.
            groups: dict[int, list[int]] = {}
            for row, ids in enumerate(contexts):
                groups.setdefault(len(ids), []).append(row)
            texts = [""] * len(chunk)
            for rows in groups.values():
                prompt = torch.tensor([contexts[r] for r in rows], device=self._device)
                out = generate(self.model, prompt, max_new, temperature=temperature, top_k=kwargs.get("top_k"),
                               top_p=kwargs.get("top_p"), stop=lambda new: self._stopped(new, until))
                for r, tokens in zip(rows, out[:, prompt.shape[1]:].tolist()):
                    texts[r] = self._cut(self.tok_decode(tokens), until)
            for (context, gen_kwargs), text in zip(chunk, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def _stopped(self, new_tokens: torch.Tensor, until: list[str]) -> torch.Tensor:
        """(B, n) generated so far -> (B,) rows whose text already holds a stop sequence."""
        if not until:
            return torch.zeros(new_tokens.shape[0], dtype=torch.bool, device=new_tokens.device)
        done = [any(stop in self.tok_decode(row) for stop in until) for row in new_tokens.tolist()]
        return torch.tensor(done, device=new_tokens.device)

    @staticmethod
    def _cut(text: str, until: list[str]) -> str:
        for stop in until:
            if stop:
                text = text.split(stop)[0]
        return text
