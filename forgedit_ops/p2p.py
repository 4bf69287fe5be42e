"""Prompt-to-Prompt's edit arithmetic (Hertz et al. 2022, §3.2) as StyleDiffusion's P2Plus uses it (Li et al. 2023,
§3.3): word → token positions, the word-swap and refinement mappers, the step windows τ_c / τ_v / τ_s / τ_u, attention
re-weighting and LocalBlend. Plain torch; the token functions take `encode(text) -> ids without BOS/EOS` and
`decode(id) -> text` so any tokenizer (ComfyUI's SD1 CLIPTokenizer in the nodes) plugs in.

Mapper convention: the edited target map is P_tgt'[..., j] = Σ_i P_src[..., i] · mapper[i, j] (replacement), or
P_src[..., mapper[j]] · α[j] + P_tgt[..., j] · (1 − α[j]) (refinement)."""
import math
import string
from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F

Encode = Callable[[str], list[int]]
Decode = Callable[[int], str]

ALIGNERS = ("reference", "fixed")


def normalise_prompt(text: str) -> str:
    """Whitespace runs collapsed to one space and the ends stripped: the reference splits words at single spaces, so
    prompt text and tokens only agree on normalised text (design §3, get_word_inds)."""
    return " ".join(text.split())


def word_indices(prompt: str, word: Union[str, int], encode: Encode, decode: Decode) -> list[int]:
    """P2P's get_word_inds: the token positions (BOS = 0) of every occurrence of `word` among the prompt's
    space-separated words (or of the word at position `word`), found by walking the decoded token lengths ('#'
    stripped) along the words."""
    words = normalise_prompt(prompt).split(" ")
    places = [k for k, w in enumerate(words) if w == word] if isinstance(word, str) else [word]
    if not places:
        return []
    pieces = [decode(t).strip("#") for t in encode(normalise_prompt(prompt))]
    out, length, ptr = [], 0, 0
    for k, piece in enumerate(pieces):
        if ptr >= len(words):  # the decoded text ran past the words (the reference would raise IndexError)
            break
        length += len(piece)
        if ptr in places:
            out.append(k + 1)
        if length >= len(words[ptr]):
            ptr, length = ptr + 1, 0
    return out


def _check_tokens(name: str, count: int, tokens: int) -> None:
    if count > tokens:
        raise ValueError(f"the {name} prompt has {count} tokens with BOS and EOS; at most {tokens} fit (75 words' "
                         f"tokens for SD1): shorten it")


def replacement_mapper(source: str, target: str, encode: Encode, decode: Decode, aligner: str = "reference",
                       tokens: int = 77) -> torch.Tensor:
    """P2P's word-swap mapper (tokens × tokens, rows = source, columns = target): equal token counts map one to one,
    otherwise each source token of the word feeds every target token with 1/n_target. 'reference' keeps the tail bug
    (after the last swapped word target j reads source j; a longer source word leaves the last targets empty),
    'fixed' keeps the source/target offset and maps leftover target pads to the last source position."""
    if aligner not in ALIGNERS:
        raise ValueError(f"aligner must be one of {ALIGNERS}, not {aligner!r}")
    source, target = normalise_prompt(source), normalise_prompt(target)
    src_words, tgt_words = source.split(" "), target.split(" ")
    if len(src_words) != len(tgt_words):
        raise ValueError(f"replace needs the same number of words in both prompts (source has {len(src_words)}, "
                         f"target {len(tgt_words)}): use refine")
    _check_tokens("source", len(encode(source)) + 2, tokens)
    _check_tokens("target", len(encode(target)) + 2, tokens)
    swaps = []
    for k in (k for k in range(len(src_words)) if src_words[k] != tgt_words[k]):
        src, tgt = word_indices(source, k, encode, decode), word_indices(target, k, encode, decode)
        if not src or not tgt:
            raise ValueError(f"cannot locate the tokens of word {k} ({src_words[k]!r} → {tgt_words[k]!r}): the "
                             f"tokenizer's pieces do not spell the words")
        swaps.append((src, tgt))
    mapper = torch.zeros(tokens, tokens)
    i = j = n = 0
    while i < tokens and j < tokens:
        if n < len(swaps) and swaps[n][0][0] == i:
            src, tgt = swaps[n]
            if len(src) == len(tgt):
                mapper[src, tgt] = 1.0
            else:
                for t in tgt:
                    mapper[src, t] = 1.0 / len(tgt)
            i, j, n = i + len(src), j + len(tgt), n + 1
            continue
        mapper[j if n == len(swaps) and aligner == "reference" else i, j] = 1.0
        i, j = i + 1, j + 1
    if aligner == "fixed":
        mapper[tokens - 1, j:] = 1.0  # a longer source word ran i out first: the remaining target pads read a pad
    return mapper


def refinement_mapper(source_ids: Sequence[int], target_ids: Sequence[int],
                      tokens: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """P2P's refinement mapper: Needleman–Wunsch over the full ids with BOS/EOS (gap 0, match +1, mismatch −1; the
    traceback prefers left = insertion, then up = deletion, then diagonal); per target position its source index
    (−1 for an inserted token, α = 0 there) and, past the target's length, itself."""
    x, y = list(source_ids), list(target_ids)
    _check_tokens("source", len(x), tokens)
    _check_tokens("target", len(y), tokens)
    score = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    move = [[1] * (len(y) + 1) for _ in range(len(x) + 1)]  # 1 left, 2 up, 3 diagonal; row 0 goes left
    for a in range(1, len(x) + 1):
        score[a][0], move[a][0] = 0, 2  # gap 0: the first column scores a·gap = 0
        for b in range(1, len(y) + 1):
            left, up = score[a][b - 1], score[a - 1][b]
            diag = score[a - 1][b - 1] + (1 if x[a - 1] == y[b - 1] else -1)
            score[a][b] = max(left, up, diag)
            move[a][b] = 1 if score[a][b] == left else 2 if score[a][b] == up else 3
    pairs, a, b = [], len(x), len(y)
    while a > 0 or b > 0:
        if move[a][b] == 3:
            a, b = a - 1, b - 1
            pairs.append(a)
        elif move[a][b] == 1:
            b -= 1
            pairs.append(-1)
        else:
            a -= 1
    pairs.reverse()
    mapper = torch.arange(tokens, dtype=torch.long)
    mapper[:len(pairs)] = torch.tensor(pairs, dtype=torch.long)
    return mapper, mapper.ne(-1).float()


def _check_tau(name: str, tau: float, steps: int) -> None:
    if not 0.0 <= tau <= 1.0 or not math.isfinite(tau):
        raise ValueError(f"{name} must be a fraction of the steps between 0 and 1, not {tau}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, not {steps}")


def cross_steps(tau_c: float, steps: int) -> int:
    """τ_c window: cross-attention is edited at steps i < int((T + 1)·τ_c), the reference's T + 1 alpha rows
    (design §1.2 #2: τ_c = 0.65, T = 30 → 20); capped at T (τ_c = 1 gives 31 rows, all T steps)."""
    _check_tau("tau_c", tau_c, steps)
    return min(steps, int((steps + 1) * tau_c))


def value_steps(tau_v: float, steps: int) -> int:
    """τ_v window (StyleDiffusion's mapped target value): the steps i with the float test i < T·τ_v, i.e. ceil(T·τ_v)
    up to float rounding (design §1.2 #2: τ_v = 0.55, T = 30 → 17)."""
    _check_tau("tau_v", tau_v, steps)
    return sum(1 for i in range(steps) if i < steps * tau_v)


def self_steps(tau: float, steps: int) -> int:
    """τ_s (cond) and τ_u (P2Plus uncond) windows: self-attention is replaced at steps i < int(T·τ)."""
    _check_tau("tau", tau, steps)
    return int(steps * tau)


def blend_begins(start: float, steps: int) -> int:
    """The first step index LocalBlend acts at: the reference's counter = i + 1 must exceed int(start·T)."""
    _check_tau("local blend start", start, steps)
    return int(start * steps)


def parse_reweight(text: str) -> list[tuple[str, float]]:
    """Parse P2P's attention re-weighting 'tiger:2, striped:1.5' into (word, factor) pairs; empty text is none."""
    if not text.strip():
        return []
    pairs = []
    for n, item in enumerate(text.replace(";", ",").split(","), 1):
        item = item.strip()
        hint = "write word:factor items separated by commas, e.g. 'tiger:2, striped:1.5'"
        if not item:
            raise ValueError(f"reweight: item {n} of {text!r} is empty (two commas in a row, or a comma at an end); "
                             f"{hint}")
        parts = [p.strip() for p in item.split(":")]
        if len(parts) != 2 or not parts[0]:
            raise ValueError(f"reweight: cannot read {item!r}; {hint}")
        if len(parts[0].split()) > 1:
            raise ValueError(f"reweight: {parts[0]!r} in {item!r} is not one word; give each word its own item, "
                             f"e.g. 'striped:1.5, tiger:2'")
        try:
            factor = float(parts[1])
        except ValueError:
            raise ValueError(f"reweight: the factor of {item!r} is not a number; {hint}") from None
        if not math.isfinite(factor):
            raise ValueError(f"reweight: the factor of {item!r} must be finite")
        pairs.append((parts[0], factor))
    return pairs


def _word_tokens(prompt: str, word: Union[str, int], encode: Encode, decode: Decode, what: str) -> list[int]:
    """Token positions of a word given by the user: exact as the reference, else the prompt word with its
    punctuation stripped ('cat' finds 'cat,'); a clear error when neither exists."""
    found = word_indices(prompt, word, encode, decode)
    if not found and isinstance(word, str):
        words = normalise_prompt(prompt).split(" ")
        for k in (k for k, w in enumerate(words) if w.strip(string.punctuation) == word):
            found += word_indices(prompt, k, encode, decode)
    if not found:
        raise ValueError(f"{what} word {word!r} is not a word of the prompt {normalise_prompt(prompt)!r}; its words "
                         f"are {normalise_prompt(prompt).split(' ')}")
    return found


def equalizer(prompt: str, pairs: Sequence[tuple[Union[str, int], float]], encode: Encode, decode: Decode,
              tokens: int = 77) -> torch.Tensor:
    """P2P's re-weighting vector (tokens,): 1 everywhere, each pair's factor at its word's tokens (later pairs win)."""
    eq = torch.ones(tokens)
    for word, factor in pairs:
        eq[_word_tokens(prompt, word, encode, decode, "reweight")] = float(factor)
    return eq


def blend_weights(prompt: str, words: Sequence[Union[str, int]], encode: Encode, decode: Decode,
                  tokens: int = 77) -> torch.Tensor:
    """One row of LocalBlend's word weights (the reference's alpha_layers): 1 at the tokens of each blend word."""
    w = torch.zeros(tokens)
    for word in words:
        w[_word_tokens(prompt, word, encode, decode, "local blend")] = 1.0
    return w


def map_grid(n: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h', w') of an attention map with n queries at latent size (h, w): each UNet level halves with ceil
    (stride-2 conv, padding 1)."""
    h, w = latent_hw
    while True:
        if h * w == n:
            return h, w
        if h * w < n or (h == 1 and w == 1):
            raise ValueError(f"attention maps with {n} queries do not fit a latent of {latent_hw[0]}×{latent_hw[1]}")
        h, w = -(-h // 2), -(-w // 2)


def local_blend_mask(store: Sequence[torch.Tensor], word_weights: torch.Tensor, threshold: float,
                     latent_hw: tuple[int, int]) -> torch.Tensor:
    """P2P's LocalBlend mask (B, 1, h, w) bool from the step-summed cross maps (B, heads, h'·w', 77) of the 1/32-level
    layers: Σ_words maps·weights → mean over layers and heads → 3×3 max-pool → nearest to the latent → / max →
    > threshold, each item ORed with item 0's."""
    if not store:
        raise ValueError("local blend needs the cross-attention maps of at least one layer")
    n = store[0].shape[2]
    if any(m.shape[2] != n or m.shape[0] != store[0].shape[0] for m in store):
        raise ValueError(f"local blend maps must share batch and query counts, got {[tuple(m.shape) for m in store]}")
    h, w = map_grid(n, latent_hw)
    maps = torch.cat([m.float() for m in store], dim=1)  # (B, layers·heads, h'w', 77)
    weights = word_weights.to(maps)[:, None, None, :]
    maps = (maps * weights).sum(-1).mean(1).reshape(-1, 1, h, w)
    maps = F.max_pool2d(maps, (3, 3), (1, 1), padding=(1, 1))
    maps = F.interpolate(maps, size=tuple(latent_hw))
    peak = maps.amax(dim=(2, 3), keepdim=True)
    mask = (maps / peak).gt(threshold) & peak.gt(0)  # an item with no weight on any token blends nothing
    return mask[:1] | mask


def blend(z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """LocalBlend's latent update, as the reference computes it: z_b ← z_0 + mask_b·(z_b − z_0); item 0 unchanged."""
    return z[:1] + mask.to(z.dtype) * (z - z[:1])
