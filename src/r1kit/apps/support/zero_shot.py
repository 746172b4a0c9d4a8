"""Zero- and few-shot intent scoring: each label is scored by the model's log-likelihood of writing it
after an instruction prompt, so no training data is needed.

The prompt is computed once per message and its keys/values shared by every label (one forward of
the prompt, then one batched forward of all the labels' tokens). Label likelihoods are divided by
the same labels' likelihoods after a content-free message ("contextual calibration", Zhao et al.,
2021), which removes the model's prior for short or common label words; the normalised result is
the confidence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from r1kit.model.cache import ContiguousKVCache

# how each intent reads to the model: plain words it may write after "Intent:"
DESCRIPTIONS: dict[str, str] = {
    "order_status": "order status",
    "cancel_order": "cancel order",
    "refund": "refund money",
    "return_item": "return item",
    "change_address": "change delivery address",
    "shipping_delay": "late delivery",
    "payment_failed": "payment failed",
    "invoice": "invoice or receipt",
    "product_question": "product question",
    "stock": "in stock",
    "coupon": "coupon code",
    "account_login": "account login",
    "complaint": "complaint",
    "human_agent": "talk to a human",
    "greeting": "greeting",
    "goodbye": "thanks goodbye",
    "out_of_scope": "unrelated to shopping",
    "affirm": "yes",
    "deny": "no",
    "shipping_cost": "shipping cost",
    "price_protection": "price drop",
}
INSTRUCTION = "Classify the online-shop customer's message. Answer with the intent only."
CONTENT_FREE = "N/A"


class LabelScorer:
    """Scores ``labels`` (intent -> words) for a message with a causal LM and its chat template.
    ``examples``: (message, intent) pairs shown before the message (few-shot); empty: zero-shot."""

    def __init__(self, model, tokenizer, template, labels: dict[str, str], examples: Sequence[tuple[str, str]] = ()) -> None:
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.intents = list(labels)
        self.examples = list(examples)
        end = template.eos_token if template is not None else ""
        encoded = tokenizer.encode_batch([f" {labels[i]}{end}" for i in self.intents], add_special_tokens=False)
        self.label_ids = [e.ids for e in encoded]
        self._baseline = self.log_likelihoods(CONTENT_FREE, calibrated=False)

    def prompt(self, message: str) -> str:
        shots = "".join(f"Message: {text}\nIntent: {self.describe(intent)}\n" for text, intent in self.examples)
        user = f"{shots}Message: {message}"
        messages = [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": user}]
        text = self.template.render(messages, add_generation_prompt=True) if self.template is not None else f"{INSTRUCTION}\n{user}\n"
        return text + "Intent:"

    def describe(self, intent: str) -> str:
        return self.tokenizer.decode(self.label_ids[self.intents.index(intent)], skip_special_tokens=True).strip()

    @torch.inference_mode()
    def log_likelihoods(self, message: str, calibrated: bool = True) -> torch.Tensor:
        """log p(label | prompt) for every label [labels], minus the content-free baseline if ``calibrated``."""
        prompt = self.tokenizer.encode(self.prompt(message), add_special_tokens=False).ids
        width = max(map(len, self.label_ids))
        config = self.model.config
        cache = ContiguousKVCache(config, config.window_for(len(prompt) + width))
        device = self.model.device
        first = self.model(torch.tensor([prompt], device=device), cache=cache, select=[-1]).float().log_softmax(-1)[0, 0]
        # every label continues the same prompt: its keys/values are shared, not recomputed per label
        count = len(self.label_ids)
        for i in range(config.num_layers):
            cache.keys[i] = cache.keys[i].expand(count, -1, -1, -1)
            cache.values[i] = cache.values[i].expand(count, -1, -1, -1)
        ids = torch.zeros(count, width, dtype=torch.long)
        for r, label in enumerate(self.label_ids):
            ids[r, : len(label)] = torch.tensor(label)
        rest = self.model(ids.to(device), cache=cache).float().log_softmax(-1).cpu()  # position j predicts token j + 1
        scores = torch.empty(count)
        for r, label in enumerate(self.label_ids):
            scores[r] = first[label[0]].cpu() + sum(rest[r, j - 1, label[j]] for j in range(1, len(label)))
        return scores - self._baseline if calibrated else scores
