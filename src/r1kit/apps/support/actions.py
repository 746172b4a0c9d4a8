"""Actions: what the assistant does once it knows enough. Each is a plug-in with the :class:`Action`
protocol, looked up by the intent it serves; :class:`DemoShop` is the shipped backend (orders and
products in SQLite, seeded with a few demo rows) so that the whole loop runs. A real shop plugs in
its own objects with the same protocol (``load_actions("package.module:factory")``).

An action never raises for a customer's mistake (an unknown order): it returns ``ok=False`` and a
message that the reply passes on.
"""

from __future__ import annotations

import importlib
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from r1kit.errors import ConfigError


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    message: str  # the facts for the reply, in plain words
    data: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Action(Protocol):
    intent: str  # the intent whose task this completes

    def run(self, slots: dict[str, str]) -> ActionResult:
        """Do it with the task's (confirmed) slot values."""
        ...


DEMO_ORDERS = [  # order_id, status, address, total, item, email
    ("A10023", "shipped", "25 Baker Street, London", 59.90, "blue hoodie", "amy@example.com"),
    ("A10024", "processing", "8 Elm Road, Leeds", 129.00, "air fryer", "ben@example.com"),
    ("A10025", "delivered", "上海市徐汇区漕溪北路18号", 35.50, "ceramic mugs", "li.wei@qq.com"),
    ("A10031", "processing", "北京市海淀区中关村大街1号", 299.00, "smartwatch", "zhang@example.com"),
    ("884512", "shipped", "3 Hill View, Cambridge", 89.99, "running shoes", "tom@mail.com"),
]
DEMO_PRODUCTS = [  # name, aliases (lower case), price, stock, description
    ("blue hoodie", ("blue hoodie", "hoodie", "卫衣"), 59.90, 12, "cotton blend, sizes S-XL, machine washable"),
    ("air fryer", ("air fryer", "空气炸锅"), 129.00, 0, "4.5 L basket, works without oil, 1400 W"),
    ("smartwatch", ("smartwatch", "smart watch", "智能手表"), 299.00, 3, "7-day battery, heart-rate sensor, water resistant"),
    ("running shoes", ("running shoes", "跑鞋"), 89.99, 20, "breathable mesh, wide-fit option, sizes 36-46"),
    ("ceramic mugs", ("ceramic mug", "mugs", "杯子", "陶瓷杯"), 17.75, 40, "set of two, 350 ml, dishwasher and microwave safe"),
]


class DemoShop:
    """A tiny shop in one SQLite file: orders you can look up, cancel, refund, return, re-address
    and invoice, and products whose stock and details you can ask about."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()  # one connection, several request threads
        with self._lock, self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS orders (order_id TEXT PRIMARY KEY, status TEXT, address TEXT, total REAL, item TEXT, email TEXT)")
            self._db.execute("CREATE TABLE IF NOT EXISTS products (name TEXT PRIMARY KEY, price REAL, stock INTEGER, description TEXT)")
            self._db.executemany("INSERT OR IGNORE INTO orders VALUES (?, ?, ?, ?, ?, ?)", DEMO_ORDERS)
            self._db.executemany("INSERT OR IGNORE INTO products VALUES (?, ?, ?, ?)", [(n, p, s, d) for n, _, p, s, d in DEMO_PRODUCTS])

    def catalogue(self) -> dict[str, str]:
        """Product alias (lower case) -> product name, for the slot rules."""
        return {alias: name for name, aliases, *_ in DEMO_PRODUCTS for alias in aliases}

    def order(self, order_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT order_id, status, address, total, item, email FROM orders WHERE order_id = ?", (order_id,)).fetchone()
        return None if row is None else dict(zip(("order_id", "status", "address", "total", "item", "email"), row))

    def product(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT name, price, stock, description FROM products WHERE name = ?", (name,)).fetchone()
        return None if row is None else dict(zip(("name", "price", "stock", "description"), row))

    def update_order(self, order_id: str, **values: Any) -> None:
        columns = ", ".join(f"{name} = ?" for name in values)
        with self._lock, self._db:
            self._db.execute(f"UPDATE orders SET {columns} WHERE order_id = ?", (*values.values(), order_id))

    def actions(self) -> list[Action]:
        return [_OrderAction(self, intent) for intent in _ORDER_ACTIONS] + [_ProductAction(self, intent) for intent in ("stock", "product_question")]


def _lookup(shop: DemoShop, slots: dict[str, str]) -> dict[str, Any]:
    return shop.order(slots["order_id"]) or {}


def _status(shop, o, slots):
    return ActionResult(True, f"order {o['order_id']} ({o['item']}) is {o['status']}; delivery address {o['address']}", o)


def _cancel(shop, o, slots):
    if o["status"] not in ("processing",):
        return ActionResult(False, f"order {o['order_id']} is already {o['status']} and can no longer be cancelled", o)
    shop.update_order(o["order_id"], status="cancelled")
    return ActionResult(True, f"order {o['order_id']} is cancelled; {o['total']:.2f} will be refunded in 3-5 days", {**o, "status": "cancelled"})


def _refund(shop, o, slots):
    amount = float(slots.get("amount") or o["total"])
    if amount > o["total"]:
        return ActionResult(False, f"the refund of {amount:.2f} is more than order {o['order_id']}'s total {o['total']:.2f}", o)
    shop.update_order(o["order_id"], status="refund requested")
    return ActionResult(True, f"a refund of {amount:.2f} for order {o['order_id']} is requested; it arrives in 3-5 days", {**o, "refund": amount})


def _return(shop, o, slots):
    if o["status"] not in ("delivered", "shipped"):
        return ActionResult(False, f"order {o['order_id']} is {o['status']}: it can be returned once it is delivered", o)
    shop.update_order(o["order_id"], status="return started")
    return ActionResult(True, f"a return for order {o['order_id']} is started; a prepaid label goes to {o['email']}", o)


def _change_address(shop, o, slots):
    if o["status"] not in ("processing", "shipped"):
        return ActionResult(False, f"order {o['order_id']} is {o['status']}: its address can no longer change", o)
    shop.update_order(o["order_id"], address=slots["address"])
    return ActionResult(True, f"order {o['order_id']} will be delivered to {slots['address']}", {**o, "address": slots["address"]})


def _invoice(shop, o, slots):
    return ActionResult(True, f"the invoice for order {o['order_id']} ({o['total']:.2f}) is sent to {slots['email']}", o)


def _delay(shop, o, slots):
    return ActionResult(True, f"order {o['order_id']} is {o['status']}; a delay report is filed with the courier", o)


def _price(shop, o, slots):
    p = shop.product(o["item"])
    gap = o["total"] - p["price"] if p else 0.0
    if gap <= 0:
        return ActionResult(False, f"the price of {o['item']} has not dropped since order {o['order_id']}", o)
    return ActionResult(True, f"{gap:.2f} price difference for order {o['order_id']} will be refunded", {**o, "difference": gap})


_ORDER_ACTIONS = {"order_status": _status, "shipping_delay": _delay, "cancel_order": _cancel, "refund": _refund, "return_item": _return,
                  "change_address": _change_address, "invoice": _invoice, "price_protection": _price}  # fmt: skip


@dataclass
class _OrderAction:
    shop: DemoShop
    intent: str

    def run(self, slots: dict[str, str]) -> ActionResult:
        order = _lookup(self.shop, slots)
        if not order:
            return ActionResult(False, f"there is no order {slots['order_id']}; please check the order number")
        return _ORDER_ACTIONS[self.intent](self.shop, order, slots)


@dataclass
class _ProductAction:
    shop: DemoShop
    intent: str

    def run(self, slots: dict[str, str]) -> ActionResult:
        p = self.shop.product(slots["product"])
        if p is None:
            return ActionResult(False, f"we do not sell {slots['product']}")
        if self.intent == "stock":
            text = f"{p['name']}: {p['stock']} in stock" if p["stock"] else f"{p['name']} is out of stock; restock expected in 2 weeks"
            return ActionResult(True, text, p)
        return ActionResult(True, f"{p['name']}: {p['description']}; price {p['price']:.2f}", p)


def load_actions(spec: str) -> list[Action]:
    """Plug-in actions from ``"package.module:factory"`` (``factory()`` returns a list of actions)."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"actions={spec!r}: give 'package.module:factory'", param="actions")
    try:
        actions = list(getattr(importlib.import_module(module), name)())
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"actions={spec!r}: cannot load it ({exc})", param="actions") from None
    bad = [a for a in actions if not isinstance(a, Action)]
    if bad:
        raise ConfigError(f"actions={spec!r}: {bad[0]!r} has no 'intent' and 'run(slots)'", param="actions")
    return actions
