"""What each intent needs to know (its slot schema) and the rules that read slot values out of a
message: regular expressions for order ids, e-mail addresses, phone numbers, amounts, coupon codes
and street addresses (English and Chinese), and the shop's catalogue for product names.

Rules are exact where the form is regular; the model's JSON-constrained extraction
(:mod:`.extraction`) covers what they miss. This module never calls a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class SlotSchema:
    """``required``: slots the action needs; ``optional``: kept when given; ``confirm``: the customer
    confirms the values before the action runs (it changes something)."""

    required: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()
    confirm: bool = False

    @property
    def slots(self) -> tuple[str, ...]:
        return self.required + self.optional


# intents that are tasks: they have slots and an action of the same name (r1kit.apps.support.actions)
SCHEMAS: dict[str, SlotSchema] = {
    "order_status": SlotSchema(("order_id",)),
    "shipping_delay": SlotSchema(("order_id",)),
    "cancel_order": SlotSchema(("order_id",), confirm=True),
    "refund": SlotSchema(("order_id",), ("amount",), confirm=True),
    "return_item": SlotSchema(("order_id",), ("product",), confirm=True),
    "change_address": SlotSchema(("order_id", "address"), confirm=True),
    "invoice": SlotSchema(("order_id", "email")),
    "price_protection": SlotSchema(("order_id",)),
    "stock": SlotSchema(("product",)),
    "product_question": SlotSchema(("product",)),
    "account_login": SlotSchema(("email",)),
}

SLOT_WORDS = {  # how a slot is named to the customer (en, zh)
    "order_id": ("order number", "订单号"),
    "address": ("new delivery address", "新的收货地址"),
    "email": ("e-mail address", "邮箱地址"),
    "product": ("product", "商品名称"),
    "amount": ("amount", "金额"),
}

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
_PHONE = re.compile(r"(?<!\d)(?:\+?86[- ]?)?1[3-9]\d{9}(?!\d)")
_AMOUNT = re.compile(r"[$¥￥€£]\s?(\d+(?:\.\d{1,2})?)|(\d+(?:\.\d{1,2})?)\s?(?:元|块|dollars?|usd|rmb|yuan|euros?)", re.IGNORECASE)
_COUPON = re.compile(r"\b([A-Z]{3,}\d{1,3})\b")
# letters + digits (A10023, SH20250117) are order ids anywhere; bare digits only after an order cue,
# or when the assistant has just asked for the order number (a postcode or a price is not an order)
_ORDER_CODE = re.compile(r"(?<![A-Za-z0-9@.])#?\s?([A-Z]{1,3}\d{5,11})(?![A-Za-z0-9])")
_ORDER_CUE = re.compile(r"(?:order|no\.|number|订单|单号|#)\D{0,12}?(\d{5,12})(?!\d)", re.IGNORECASE)
_BARE_DIGITS = re.compile(r"(?<![\d.])(\d{5,12})(?![\d.])")
_STREET = re.compile(r"\b\d{1,5}[A-Za-z]?\s+(?:[A-Z][a-z]+\s+){1,3}(?:Street|St|Road|Rd|Avenue|Ave|Lane|Close|Drive|Way|Park|View|Boulevard|Square)\b"
                     r"(?:,\s*[A-Z][A-Za-z]*(?:\s+[A-Z0-9][A-Za-z0-9]*)*)*")  # fmt: skip
_ZH_ADDRESS = re.compile(r"(?:地址(?:改成|改为|换成|是|为|用)?|改成|改为|寄到|送到|改送到)[:：\s]*"
                         r"([\u4e00-\u9fff0-9A-Za-z]{2,}?(?:市|区|县|路|街|道)[\u4e00-\u9fff0-9A-Za-z]*?(?:号|室|弄|栋|单元|门|$))")  # fmt: skip
_YES = re.compile(r"^\s*(?:(?:y|yes|yeah|yep|yup|sure|ok|okay|correct|confirm(?:ed)?|right)(?![a-z])|是|对|好|确认|没错|可以|行)", re.IGNORECASE)
_NO = re.compile(r"^\s*(?:(?:n|no|nope|nah|wrong|incorrect)(?![a-z])|不|错了|否)", re.IGNORECASE)


def extract(text: str, expecting: str | None = None, catalogue: dict[str, str] | None = None) -> dict[str, str]:
    """Slot values the rules find in ``text``. ``expecting``: the slot the assistant just asked for (a
    bare number then counts as an order id); ``catalogue``: product alias (lower case) -> product name."""
    found: dict[str, str] = {}
    if m := _EMAIL.search(text):
        found["email"] = m.group(0)
    scrubbed = _EMAIL.sub(" ", text)
    if m := _PHONE.search(scrubbed):
        found["phone"] = re.sub(r"\D", "", m.group(0))[-11:]
    scrubbed = _PHONE.sub(" ", scrubbed)
    if (m := _ORDER_CODE.search(scrubbed)) or (m := _ORDER_CUE.search(scrubbed)) or expecting == "order_id" and (m := _BARE_DIGITS.search(scrubbed)):
        found["order_id"] = m.group(1)
    if m := _AMOUNT.search(scrubbed):
        found["amount"] = m.group(1) or m.group(2)
    if (m := _COUPON.search(scrubbed)) and m.group(1) != found.get("order_id"):
        found["coupon_code"] = m.group(1)
    if m := _STREET.search(text):
        found["address"] = m.group(0).strip(" ,")
    elif m := _ZH_ADDRESS.search(text):
        found["address"] = m.group(1)
    if catalogue:
        lowered = text.lower()
        hits = [(len(alias), name) for alias, name in catalogue.items() if alias in lowered]
        if hits:
            found["product"] = max(hits)[1]
    return found


def says_yes(text: str) -> bool:
    return bool(_YES.match(text)) and not says_no(text)


def says_no(text: str) -> bool:
    return bool(_NO.match(text))
