"""ECS, ExCae's expertized caption selection (Chen et al. 2025): a mixture of experts fusing a unit's window and
caption embeddings into the one embedding a text query is matched against.

A unit (a video or a segment) is a set of tokens, all in the dual encoder's joint space: the unit embeddings of
its feature windows and the text embeddings of its captions (ReCap's and the enhanced ones), each with its kind.
Mean fusion is normalize(normalize(mean windows) + normalize(mean captions)). Each expert pools the tokens with
attention from a query of its own and maps the pool through an MLP of its own; a router reads the mean fusion and
weights the experts. The fused embedding is normalize(mean fusion + sum_i gate_i * expert_i): with no active expert
it is mean fusion, and each expert's last layer starts at zero, so training starts from mean fusion.

Routing reads the video side only, as ExCae's released code does. The paper's text has the router judge relevance
to the query, but then a video's embedding would depend on the query and nothing could be indexed before it comes.
Training uses the top-k experts (`active`), their gates renormalised; evaluation uses `eval_routing`: "topk" as in
training or "dense" (every expert, the router's softmax), as the released code evaluates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

WINDOW, CAPTION = 0, 1  # token kinds


@dataclass
class EcsConfig:
    embed_dim: int = 256
    num_experts: int = 8
    active: int = 2            # experts per unit in training; 0 = mean fusion (no parameters trained)
    hidden: int = 512
    eval_routing: str = "topk"  # topk | dense

    def __post_init__(self):
        if not 0 <= self.active <= self.num_experts:
            raise ValueError(f"ecs: active = {self.active} experts of {self.num_experts}: must be 0..num_experts")
        if self.eval_routing not in ("topk", "dense"):
            raise ValueError(f"ecs: eval_routing = {self.eval_routing!r}: not topk or dense")

    def to_dict(self) -> dict:
        return asdict(self)


class Expert(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.query = nn.Parameter(torch.randn(dim) * dim**-0.5)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """tokens (B, N, E), mask (B, N) True where a token is -> (B, E)."""
        scores = (tokens @ self.query).masked_fill(~mask, float("-inf"))
        pooled = (scores.softmax(dim=-1).unsqueeze(-1) * tokens).sum(dim=1)
        return self.mlp(pooled)


def mean_fusion(tokens: torch.Tensor, kinds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """normalize(normalize(mean of the window tokens) + normalize(mean of the caption tokens)); a kind a unit lacks
    adds nothing."""
    parts = []
    for kind in (WINDOW, CAPTION):
        chosen = (mask & (kinds == kind)).unsqueeze(-1).float()
        parts.append(F.normalize((tokens * chosen).sum(dim=1) / chosen.sum(dim=1).clamp(min=1), dim=-1))
    return F.normalize(parts[0] + parts[1], dim=-1)


class ExpertSelection(nn.Module):
    def __init__(self, config: EcsConfig):
        super().__init__()
        self.config = config
        self.kind_embedding = nn.Embedding(2, config.embed_dim)
        nn.init.normal_(self.kind_embedding.weight, std=0.02)
        self.experts = nn.ModuleList(Expert(config.embed_dim, config.hidden) for _ in range(config.num_experts))
        self.router = nn.Linear(config.embed_dim, config.num_experts)

    def route(self, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(router probabilities, gates), both (B, num_experts); gates are zero outside the chosen experts."""
        probs = self.router(base).softmax(dim=-1)
        if not self.training and self.config.eval_routing == "dense":
            return probs, probs
        top = probs.topk(self.config.active, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
        return probs, gates

    def forward(self, tokens: torch.Tensor, kinds: torch.Tensor, mask: torch.Tensor):
        """tokens (B, N, E) unit length, kinds (B, N) WINDOW | CAPTION, mask (B, N) -> (fused (B, E) unit length,
        router probabilities, gates); probabilities and gates are None with no active expert."""
        base = mean_fusion(tokens, kinds, mask)
        if self.config.active == 0:
            return base, None, None
        probs, gates = self.route(base)
        x = tokens + self.kind_embedding(kinds)
        chosen = gates.sum(dim=0).nonzero().flatten().tolist()  # experts no unit of the batch uses do not run
        mixed = sum(gates[:, i:i + 1] * self.experts[i](x, mask) for i in chosen)
        return F.normalize(base + mixed, dim=-1), probs, gates


def load_balance(probs: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """Switch Transformer's auxiliary loss: num_experts * sum_i f_i * P_i, f_i the share of the batch's expert
    choices that went to expert i, P_i its mean router probability; 1 when the load is even."""
    chosen = (gates > 0).float()
    share = chosen.sum(dim=0) / chosen.sum().clamp(min=1)
    return probs.shape[1] * (share * probs.mean(dim=0)).sum()
