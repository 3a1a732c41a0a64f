"""Answer scoring shared by every module: tokens, last-position logits, answer log-probs, greedy match.

Batching is exact: forward passes use right padding and read each row at its own last real token
(causal attention never lets a real token see the padding after it); generation uses left padding
with an attention mask and the KV cache, as Hugging Face's `generate` does (`patchlab.decoding`).
Prompts are sorted by length inside a call so that batches carry little padding, and results come
back in the caller's order.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from patchlab.core.errors import PatchlabError
from patchlab.core.forms import answer_text
from patchlab.runtime.decoding import Prefixes, greedy_tokens, length_batches, pad_id
from patchlab.runtime.trace import Hooks, attached

DEFAULT_BATCH = 32
MAX_NEW_TOKENS = 6


def encode(model, prompt: str, where: str = "prompt") -> list[int]:
    """Token ids of `prompt` as the model reads it (its own BOS rule); never truncated."""
    ids = model.to_tokens(prompt, truncate=False)[0].tolist()
    if not ids:
        raise PatchlabError("prompt tokenizes to nothing", where=where)
    n_ctx = int(model.cfg.n_ctx)
    if len(ids) > n_ctx:
        raise PatchlabError(
            f"prompt is {len(ids)} tokens, longer than the model's context ({n_ctx}); "
            "patchlab never truncates (every metric reads the prompt's last token)",
            where=where,
        )
    return ids


def chat_prompt(model, question: str, history: Sequence[tuple[str, str]] = ()) -> str | None:
    """`question` as the user turn of the model's own chat template, ready for the assistant's answer (the
    template's BOS text dropped when the model adds BOS itself); None for a model without a template.
    `history`: earlier (question, answer) turns, e.g. a few-shot prompt's demonstrations."""
    tok = model.tokenizer
    if not getattr(tok, "chat_template", None):
        return None
    turns = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    messages = [*turns, {"role": "user", "content": question}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tok.bos_token
    if bos and text.startswith(bos) and getattr(model.cfg, "default_prepend_bos", False):
        text = text[len(bos) :]
    return text


def answer_token_ids(
    model, answer: str, where: str | None = "answer", param: str | None = None, after: str | None = None
) -> list[int]:
    """Token ids of " " + answer without BOS: how the answer continues a prompt. After a prompt that ends in
    whitespace (`after`: a chat template's assistant turn ends in a newline) the answer starts a new word
    without its own space."""
    lead = "" if after and after[-1].isspace() else " "
    ids = model.tokenizer(lead + answer.strip(), add_special_tokens=False)["input_ids"]
    if not answer.strip() or not ids:
        raise PatchlabError(f"answer {answer!r} tokenizes to nothing", where=where, param=param)
    return list(ids)


def answer_token_id(
    model, answer: str, where: str | None = "answer", param: str | None = None, after: str | None = None
) -> int:
    """The first token of " " + answer (see `answer_token_ids`): the token that patching and lens metrics read."""
    return answer_token_ids(model, answer, where, param, after)[0]


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Int[Tensor, "b pos"], Int[Tensor, " b"]]:
    """Right-pad token lists into one tensor; also return each row's true length."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, torch.tensor([len(s) for s in seqs], dtype=torch.long)


def map_last_logits(
    model,
    prompts: Sequence[str],
    fn: Callable[[Float[Tensor, "b vocab"], list[int]], Tensor] | None = None,
    batch_size: int = DEFAULT_BATCH,
    fwd_hooks: Hooks = (),
) -> Tensor:
    """Run every prompt and return fn(last-position logits, row indices), stacked in prompt order.

    With fn=None the full last-position logits come back ([n, vocab]).
    """
    seqs = [encode(model, p, where=f"prompt[{i}]") for i, p in enumerate(prompts)]
    pad = pad_id(model)
    out: list[Tensor | None] = [None] * len(seqs)
    with torch.inference_mode(), attached(model, fwd_hooks):
        for rows in length_batches([len(s) for s in seqs], batch_size):
            tokens, lengths = pad_right([seqs[i] for i in rows], pad)
            logits = model(tokens.to(model.cfg.device))
            last = logits[torch.arange(len(rows)), (lengths - 1).to(logits.device)].float().cpu()
            values = last if fn is None else fn(last, rows)
            for j, i in enumerate(rows):
                out[i] = values[j]
    return torch.stack(out)  # type: ignore[arg-type]


def last_logits(model, prompts: Sequence[str], batch_size: int = DEFAULT_BATCH, fwd_hooks: Hooks = ()) -> Tensor:
    """Logits at each prompt's last token, [n, vocab]."""
    return map_last_logits(model, prompts, None, batch_size, fwd_hooks)


def answer_logprob(
    model,
    prompts: Sequence[str],
    answers: Sequence[str],
    batch_size: int = DEFAULT_BATCH,
    fwd_hooks: Hooks = (),
) -> Float[Tensor, " n"]:
    """Teacher-forced log-probability of the whole answer (" " + answer) after each prompt."""
    if len(prompts) != len(answers):
        raise PatchlabError(f"{len(prompts)} prompts but {len(answers)} answers")
    seqs, spans = [], []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids, ans = encode(model, p, where=f"prompt[{i}]"), answer_token_ids(model, a, where=f"answer[{i}]", after=p)
        spans.append((len(ids), len(ans)))
        seqs.append(ids + ans)
    pad = pad_id(model)
    out = torch.zeros(len(seqs), dtype=torch.float64)
    with torch.inference_mode(), attached(model, fwd_hooks):
        for rows in length_batches([len(s) for s in seqs], batch_size):
            tokens, _ = pad_right([seqs[i] for i in rows], pad)
            logp = torch.log_softmax(model(tokens.to(model.cfg.device)).float(), dim=-1).cpu()
            for j, i in enumerate(rows):
                start, n = spans[i]
                targets = torch.tensor(seqs[i][start : start + n])
                out[i] = logp[j, start - 1 : start - 1 + n].gather(-1, targets[:, None]).sum().double()
    return out


def greedy_continuations(
    model,
    prompts: Sequence[str],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH,
    fwd_hooks: Hooks = (),
    progress: str | None = None,
    names: Sequence[str] | None = None,
    cache: bool = True,
    nonfinite: list[bool] | None = None,
    first_logits: list[Tensor] | None = None,
    stop_when: Callable[[int, str], bool] | None = None,
    prefixes: Prefixes | None = None,
    reuse: bool = False,
) -> list[str]:
    """The greedy continuation text of each prompt: token for token what plain transformers' greedy
    `generate` gives for the same token ids (see `patchlab.decoding`; special tokens dropped).

    `names` says where each prompt came from in error messages (default `prompt[i]`); `cache=False`
    decodes with one full forward per token (for hooks that index absolute positions). `first_logits`
    (if given) gets each prompt's last-position logits, read off the first decoding step; `stop_when(i,
    text)` lets prompt i stop once its text so far settles what the caller reads (then the text is cut);
    `prefixes` / `reuse`: see `patchlab.runtime.decoding.Prefixes`."""
    seqs = [encode(model, p, where=names[i] if names else f"prompt[{i}]") for i, p in enumerate(prompts)]
    decode = lambda t: model.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    decided = (lambda i, t: stop_when(i, decode(t))) if stop_when else None
    new = greedy_tokens(
        model, seqs, max_new_tokens, batch_size, fwd_hooks, progress, cache, nonfinite, first_logits, decided,
        prefixes, reuse,
    )  # fmt: skip
    return [decode(t) for t in new]


_PUNCT = re.compile(r"[^\w\s]")


def normalize(text: str) -> str:
    """Lowercase, strip accents and punctuation, collapse whitespace: the form answers are compared in."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(_PUNCT.sub(" ", text).split())


def matches(continuation: str, answers: Sequence[str]) -> bool:
    """Whether any answer (or alias) occurs as whole words in the continuation."""
    cont = f" {normalize(continuation)} "
    return any(norm and f" {norm} " in cont for norm in (normalize(a) for a in answers))


def settled(text: str, answers: Sequence[str], form: str) -> bool:
    """Can more tokens no longer change whether `text` (a continuation so far) counts as answered in `form`?

    True once an answer matches in the text up to its last whitespace character: words before it are
    complete, so appended text cannot undo the match (a trailing partial word, even a partial UTF-8
    character, lies after it). In the qa and chat forms also once the answer line is complete (a newline
    after some text): only the first line is read."""
    if form != "plain":
        head = text.lstrip()
        if "\n" in head:
            return True
    cut = max(text.rfind(c) for c in (" ", "\n", "\t"))
    return cut > 0 and matches(answer_text(text[:cut], form), answers)


def correct(
    model,
    prompts: Sequence[str],
    answer_sets: Sequence[Sequence[str]],
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH,
    fwd_hooks: Hooks = (),
    progress: str | None = None,
    names: Sequence[str] | None = None,
    nonfinite: list[bool] | None = None,
) -> tuple[list[bool], list[str]]:
    """Is each prompt answered right (its greedy continuation contains an allowed answer)? `nonfinite` (if
    given) is filled with, per prompt, whether NaN / inf logits met its decoding (its answer means nothing)."""
    conts = greedy_continuations(
        model, prompts, max_new_tokens, batch_size, fwd_hooks, progress, names, nonfinite=nonfinite
    )
    return [matches(c, a) for c, a in zip(conts, answer_sets)], conts
