"""The bidirectional transformer that LLaDA and Dream share.

Both are pre-norm decoder stacks with RMSNorm, rotary position embeddings (half-split
rotation), a SwiGLU MLP and no causal mask; they differ in grouped-query attention, q/k/v bias,
tied heads and whether logits are shifted by one position. Checkpoint names are mapped onto
these modules by ``llada.py`` and ``dream.py``. Single-device: no process groups here.

The layer and its parts are in ``layers.py``, the shape in ``transformer_config.py``, the KV caches
the entry points take and return in ``cache.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from paradec.ops import batch_invariant as bi
from paradec.errors import InputError
from paradec.models.attention import PAD, PROMPT, SUMMARY, attention_mask, check_mode
from paradec.models.cache import BlockCache, PackedQueries, PromptCache, kv_buffer
from paradec.models.layers import Layer, Linear, RMSNorm, RotaryEmbedding
from paradec.models.transformer_config import TransformerConfig


class DiffusionTransformer(nn.Module):
    """A masked-diffusion transformer with one forward for every decoding mode."""

    def __init__(self, cfg: TransformerConfig, shift_logits: bool):
        super().__init__()
        self.cfg = cfg
        self.shift_logits = shift_logits
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def _check(self, input_ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor) -> None:
        if input_ids.dim() != 2 or positions.shape != input_ids.shape or segments.shape != input_ids.shape:
            raise InputError(
                "input_ids, positions and segments must all be [B, T]; got "
                f"{tuple(input_ids.shape)}, {tuple(positions.shape)}, {tuple(segments.shape)}"
            )
        if input_ids.numel() == 0:
            return
        top = int(positions.max())
        if top >= self.cfg.max_length:
            raise InputError(f"position {top} is beyond the model's maximum length {self.cfg.max_length}")
        real = segments != PAD
        ids = input_ids[real]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size):
            raise InputError(f"input_ids must lie in [0, {self.cfg.vocab_size}); got [{int(ids.min())}, {int(ids.max())}]")

    def run_layers(
        self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: PromptCache | None,
        slots: torch.Tensor | PackedQueries | None = None, query_segments: torch.Tensor | None = None,
        layers: slice = slice(None),
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Every layer (or the ``layers`` slice of them: x is then the hidden state before the
        first) over embedded inputs, without the final norm and head.

        x: [B, T, d] (``embed`` of the ids); positions: [B, T]; mask: [B, 1, T, K] boolean,
        True where a query sees a key, K = cache.num_tokens + T (or C, the cache's capacity,
        with ``slots``), or None; cache: the KV the queries also attend to, or None; slots: [T]
        (or [B, T], each row's own) cache slots where these tokens' k/v are written first (a static cache, see
        ``Attention.forward``), or ``PackedQueries``: x [1, N, d] and positions [1, N] are then
        the real queries of a [B, T] batch of rows, the mask and query_segments the batch's.
        Returns hidden [B, T, d] (or [1, N, d]) and each layer's new (k, v), each
        [B, Hkv, T, D] (written into the cache at ``slots`` when given). The mask is turned here
        once into the additive form that attention kernels take (given a boolean one, each
        layer's call would convert it again: ~4.5 µs a layer at an 8B step's shapes); None when
        every query attends to every key (see ``forward``'s ``dense``). In the batch-invariant
        mode the mask also names, once for every layer, the keys each query sees (``bi.MaskedKeys``):
        query_segments [B, T] (the queries' attention segments, whose queries see the same keys)
        groups the queries, so that a query attends over its own keys in index order wherever
        they sit (a think block among the others as in a row of its own); None: one group a row."""
        if mask is not None:  # rows padded to 8 elements in storage: SDPA takes such a slice without a copy
            keys = mask.shape[-1]
            storage = torch.zeros(*mask.shape[:-1], -(-keys // 8) * 8, dtype=x.dtype, device=x.device)
            additive = storage[..., :keys].masked_fill_(~mask, float("-inf"))
            if bi.active(x):
                groups = None if query_segments is None else query_segments - SUMMARY
                mask = bi.masked_keys(mask, additive, groups)
            else:
                mask = additive
        cos, sin = self.rope(positions)
        new_kv = []
        for i in range(len(self.layers))[layers]:
            layer = self.layers[i]
            past = None if cache is None else (cache.kv[i, 0], cache.kv[i, 1])
            x, kv = layer(x, cos, sin, mask, past, 0 if cache is None else cache.num_tokens, slots)
            new_kv.append(kv)
        return x, new_kv

    @torch.no_grad()
    def prefill(
        self, prompt_ids: torch.Tensor, lengths: torch.Tensor, reserve: int = 0, check_inputs: bool = True
    ) -> PromptCache:
        """prompt_ids: [B, P] right-padded; lengths: [B] -> the prompts' KV cache, with room for
        ``reserve`` more tokens (the largest forward that will use it, to avoid a copy per step)."""
        b, p = prompt_ids.shape
        lengths = lengths.to(prompt_ids.device)
        if check_inputs and (lengths.numel() != b or int(lengths.min()) < 1 or int(lengths.max()) > p):
            raise InputError(f"lengths must be [B] = [{b}] values in [1, {p}], got {lengths.tolist()}")
        positions = torch.arange(p, device=prompt_ids.device).expand(b, p)
        segments = torch.where(positions < lengths[:, None], PROMPT, PAD)
        positions = torch.where(segments == PAD, -1, positions)
        if check_inputs:
            self._check(prompt_ids, positions, segments)
        mask = attention_mask(segments, segments, "isolated")
        hidden, kv = self.run_layers(self.embed(prompt_ids.clamp(min=0)), positions, mask, None, None, segments)
        kv = kv_buffer(None, kv, reserve)
        last = hidden[torch.arange(b, device=hidden.device), lengths - 1]  # [B, d]
        return PromptCache(kv=kv, segments=segments, lengths=lengths, last_hidden=last)

    @torch.no_grad()
    def extend(
        self,
        cache: PromptCache,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor,
        mode: str,
        reserve: int = 0,
    ) -> PromptCache:
        """A new cache holding ``cache`` plus these tokens' KV (finished think blocks, say,
        before the summary decodes), and the last token's hidden state (``PromptCache.lengths``).
        Exact under ``isolated`` when nothing cached attends to tokens that come later.
        input_ids, positions, segments: [B, T] (every row's last column a real token)."""
        check_mode(mode)
        self._check(input_ids, positions, segments)
        key_segments = torch.cat((cache.segments, segments), dim=1)
        mask = attention_mask(segments, key_segments, mode)
        hidden, kv = self.run_layers(self.embed(input_ids.clamp(min=0)), positions, mask, cache, None, segments)
        buffer = kv_buffer(cache.kv[..., : cache.num_tokens, :], kv, reserve)
        return PromptCache(kv=buffer, segments=key_segments, lengths=positions[:, -1] + 1, last_hidden=hidden[:, -1])

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor,
        mode: str,
        cache: PromptCache | None = None,
        logits_at: torch.Tensor | None = None,
        check_inputs: bool = True,
        dense: bool = False,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits for the positions asked for, and only those.

        input_ids, positions, segments: [B, T] (segments from ``AttentionSpec.segment_ids``;
        PAD marks padding); cache: the prompt KV of the same B sequences, or None when the prompt
        is part of the input; logits_at: [B, N] absolute positions whose token distribution is
        wanted (default: every input position). Returns [B, N, V] in the model dtype.

        A shifted model (Dream) predicts position p from the hidden state at p - 1, which must be
        in the input or be the last prompt token of ``cache``.

        dense: the caller knows that under ``mode`` every query attends to every key (no PAD
        among them, one segment or ``canvas`` attention); attention then runs with no mask,
        which the fastest kernels take (an all-true mask still costs its reads: 38 against
        23 µs a layer at an 8B block step's shapes). Checked when ``check_inputs``.

        slots: [T] (or [B, T]) slots of ``cache`` where these tokens' k/v are written before they attend
        (a static cache: every slot is then a key, and ``cache.segments`` covers all of them).
        """
        check_mode(mode)
        if check_inputs:
            self._check(input_ids, positions, segments)
        if slots is None:
            key_segments = segments if cache is None else torch.cat((cache.segments, segments), dim=1)
        elif cache is None or cache.capacity != cache.num_tokens or slots.shape not in (input_ids.shape[1:],
                                                                                        input_ids.shape):
            raise InputError("slots needs a cache whose segments cover all its slots and one slot per input column "
                             "([T], or [B, T] per row)")
        else:
            key_segments = cache.segments
        mask = None if dense and not check_inputs else attention_mask(segments, key_segments, mode)
        if dense and mask is not None:  # checked, then dropped
            if not bool(mask.all()):
                raise InputError(f"dense=True, but under {mode!r} attention some query may not see some key "
                                 "(padding, or another block's keys)")
            mask = None
        hidden, _ = self.run_layers(self.embed(input_ids.clamp(min=0)), positions, mask, cache, slots, segments)
        if logits_at is None:
            logits_at = positions
        rows = self.gather_rows(hidden, positions, segments, logits_at, cache, check_inputs)
        return self.head(rows)

    @torch.no_grad()
    def forward_blocks(
        self, input_ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor, cache: BlockCache,
        slots: torch.Tensor, logits_at: torch.Tensor,
    ) -> torch.Tensor:
        """``forward`` for m isolated blocks' queries over a ``BlockCache``: input_ids,
        positions, segments: [B, m * S], block-major, every column real (pad a block's queries by
        repeating one of its columns: the repeat writes the same k/v to the same slot); slots:
        [B * m * S] flat cache slots of the queries, where their k/v are written before the
        blocks attend; logits_at: [B, N]. Returns logits [B, N, V]. A shifted model's
        predecessor columns must be among the queries."""
        x = self.embed(input_ids.clamp(min=0))
        cos, sin = self.rope(positions)
        bias = cache.bias
        if bias is not None and bi.active(x):  # each row's visible slots, once for every layer
            bias = bi.MaskedKeys(bias, *bi.key_order(bias[:, 0, 0] > float("-inf")))
        for i, layer in enumerate(self.layers):
            x = layer.forward_blocks(x, cos, sin, cache.kv[i], bias, slots)
        return self.head(self.gather_rows(x, positions, segments, logits_at, None, check_inputs=False))

    @torch.no_grad()
    def forward_and_cache(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        segments: torch.Tensor,
        mode: str,
        cache: PromptCache | None,
        logits_at: torch.Tensor,
        keep: torch.Tensor,
        reserve: int,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PromptCache]:
        """``forward`` that also returns a cache for the steps that follow (a window's refresh).

        The new cache holds ``cache`` (if any) plus the KV of the input columns where ``keep``
        ([T] bool, the same for every row) is True, with room for ``reserve`` tokens; the columns
        left out are the ones later steps recompute. With ``cache=None`` the prompt is part of
        the input: ``lengths`` ([B]) gives each prompt's length (its tokens are input columns
        ``0..length-1``), and the last prompt token's hidden state is taken from this forward.
        Reusing this KV while the recomputed columns change is exact only where nothing kept
        attends to them (``isolated`` prompt KV); otherwise it is the prefix/dual-cache
        approximation of Fast-dLLM. Returns logits [B, N, V] and the cache."""
        check_mode(mode)
        key_segments = segments if cache is None else torch.cat((cache.segments, segments), dim=1)
        mask = attention_mask(segments, key_segments, mode)
        hidden, kv = self.run_layers(self.embed(input_ids.clamp(min=0)), positions, mask, cache, None, segments)
        rows = self.gather_rows(hidden, positions, segments, logits_at, cache, check_inputs=False)
        logits = self.head(rows)
        kept = keep.nonzero()[:, 0]  # [K] input columns whose KV is kept
        kept_kv = [(k[:, :, kept], v[:, :, kept]) for k, v in kv]
        if cache is None:
            b = input_ids.shape[0]
            last = hidden[torch.arange(b, device=hidden.device), lengths - 1]  # [B, d]
            return logits, PromptCache(kv_buffer(None, kept_kv, reserve), segments[:, kept], lengths, last)
        buffer = kv_buffer(cache.kv[..., : cache.num_tokens, :], kept_kv, reserve)
        key_segments = torch.cat((cache.segments, segments[:, kept]), dim=1)
        return logits, PromptCache(buffer, key_segments, cache.lengths, cache.last_hidden)

    def training_logits(
        self, input_ids: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor, mode: str,
        targets: torch.Tensor,
    ) -> torch.Tensor:
        """Differentiable logits for training: the whole sequence in one forward (no cache),
        logits only where ``targets`` is True, the logit shift applied (a shifted model predicts
        position p from the hidden state at p - 1, which must be in the input).

        input_ids, positions, segments, targets: [B, T] -> [M, V] for the M target positions in
        row-major order."""
        check_mode(mode)
        mask = attention_mask(segments, segments, mode)
        hidden, _ = self.run_layers(self.embed(input_ids.clamp(min=0)), positions, mask, None)  # [B, T, d]
        if self.shift_logits:
            if bool(targets[:, 0].any()):
                raise InputError("a shifted model cannot be trained to predict position 0 of a sequence")
            rows = hidden[:, :-1][targets[:, 1:]]
        else:
            rows = hidden[targets]
        return self.head(rows)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm, output head and logit scale: hidden [..., d] -> logits [..., V]."""
        logits = self.lm_head(self.norm(hidden))
        return logits * self.cfg.logit_scale if self.cfg.logit_scale != 1.0 else logits

    def gather_rows(
        self, hidden: torch.Tensor, positions: torch.Tensor, segments: torch.Tensor, logits_at: torch.Tensor,
        cache: PromptCache | None, check_inputs: bool,
    ) -> torch.Tensor:
        """Hidden states that predict ``logits_at``: [B, N, d], for ``head``.

        hidden: [B, T, d] (``run_layers``' output); positions, segments: [B, T] of its columns;
        logits_at: [B, N] absolute positions (< 0: not wanted; that row is arbitrary). A shifted
        model reads position p - 1's state, from the columns or, for the first position after
        the prompt, from ``cache.last_hidden`` ([B, d]). With ``check_inputs`` a wanted position
        whose state is in neither raises ``InputError``."""
        source = logits_at - int(self.shift_logits)
        if self.shift_logits:
            # Dream's convention: position 0 has no predecessor and is read from itself.
            source = torch.where(logits_at == 0, 0, source)
        real = segments != PAD
        match = (positions[:, None, :] == source[:, :, None]) & real[:, None, :]  # [B, N, T]
        found = match.any(-1)
        rows = hidden.gather(1, match.float().argmax(-1, keepdim=True).expand(-1, -1, hidden.shape[-1]))
        missing = ~found & (logits_at >= 0)
        if cache is not None and self.shift_logits:
            from_cache = missing & (source == (cache.lengths - 1)[:, None])
            rows = torch.where(from_cache[..., None], cache.last_hidden[:, None, :], rows)
            missing = missing & ~from_cache
        if check_inputs and bool(missing.any()):
            b, n = missing.nonzero()[0].tolist()
            raise InputError(
                f"logits_at[{b}, {n}] = {int(logits_at[b, n])} needs the hidden state at position "
                f"{int(source[b, n])}, which is neither in the input nor the cached prompt's last token"
            )
        return rows


def count_parameters(module: nn.Module) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
