"""A weighted mix of rewards, each term reported separately.

Absolute: ``score = sum_i w_i score_i``. Under SRP, text-conditioned terms contribute
``w_i * relative_i`` (their own scale and cached text features) and image-only terms
``w_i * score_i``: their text-independent bias is not cancelled, so give them small weights.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import UserError
from .base import Reward
from .srp import SRP, SRPScores


class MixedReward(Reward):
    scale = 1.0

    def __init__(self, terms: list[tuple[Reward, float]], names: list[str] | None = None):
        super().__init__()
        if not terms:
            raise UserError("a reward mix needs at least one term")
        names = list(names) if names is not None else [getattr(r, "name", None) or type(r).__name__ for r, _ in terms]
        if len(names) != len(terms):
            raise ValueError("one name per term")
        self.rewards = nn.ModuleList([r for r, _ in terms])
        self.weights = [float(w) for _, w in terms]
        self.names = self._unique(names)
        self.text_conditioned = any(getattr(r, "text_conditioned", True) for r in self.rewards)
        self._srps: dict[str, list[SRP | None]] = {}

    @staticmethod
    def _unique(names: list[str]) -> list[str]:
        seen: dict[str, int] = {}
        out = []
        for n in names:
            out.append(n if n not in seen else f"{n}_{seen[n]}")
            seen[n] = seen.get(n, 0) + 1
        return out

    def encode_image(self, images: Tensor) -> Tensor:
        raise UserError("a reward mix has no single feature space: use score(), terms() or SRP")

    encode_text = encode_image

    def terms(self, images: Tensor, prompts: list[str]) -> dict[str, Tensor]:
        """Unweighted absolute score of each term, [B] each."""
        return {n: r.score(images, prompts) for n, r in zip(self.names, self.rewards)}

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        return sum(w * s for w, s in zip(self.weights, self.terms(images, prompts).values()))

    def _term_srps(self, srp: SRP) -> list[SRP | None]:
        """One SRP (own text cache) per text-conditioned term, per template."""
        if srp.template not in self._srps:
            self._srps[srp.template] = [
                SRP(r, srp.pos_words, srp.neg_words, srp.template) if getattr(r, "text_conditioned", True) else None
                for r in self.rewards
            ]
        return self._srps[srp.template]

    def srp_relative(self, srp: SRP, images: Tensor, prompts: list[str], pos_word: str, neg_word: str,
                     k: Tensor | float = 0.0) -> SRPScores:
        """SRP of the mix: weighted relative scores of text terms + weighted absolute scores of
        image-only terms; ``terms`` holds each term's unweighted value."""
        relative = pos = neg = 0.0
        terms = {}
        for name, w, r, s in zip(self.names, self.weights, self.rewards, self._term_srps(srp)):
            if s is None:
                value = r.score(images, prompts)
            else:
                out = s.relative(images, prompts, pos_word, neg_word, k)
                value, pos, neg = out.relative, pos + w * out.pos, neg + w * out.neg
            terms[name] = value
            relative = relative + w * value
        return SRPScores(relative, pos, neg, terms)
