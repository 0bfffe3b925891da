"""Evaluation: the causal-LM loss, perplexity, greedy generation and exact match, KL drift.

    losses.py      the loss on labelled positions only (fused linear cross-entropy); training uses it too
    perplexity.py  mean loss and perplexity over a dataset
    generation.py  greedy completions of chat prompts; exact match against the expected answers
    drift.py       KL(adapter ‖ base) per token: how far an adapter moved the model
    forgetting.py  the forgetting check: base vs adapter perplexity and KL on shipped general text
"""

from .drift import kl_drift
from .forgetting import forgetting, general_text
from .generation import exact_match, generate, prompt_and_answer
from .losses import token_loss_sum
from .perplexity import loss_and_perplexity

__all__ = ["exact_match", "forgetting", "general_text", "generate", "kl_drift", "loss_and_perplexity", "prompt_and_answer", "token_loss_sum"]
