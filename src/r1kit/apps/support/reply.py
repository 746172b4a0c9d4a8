"""The reply: the policy's decision and the tracked facts become a short instruction (what to tell
the customer, in their language), and the model writes the words. Prompts stay short: the default
model has 135M parameters, and it does best rephrasing one clear point.
"""

from __future__ import annotations

from r1kit.apps.support.actions import ActionResult
from r1kit.apps.support.dialogue import Session
from r1kit.apps.support.policy import (
    ACT,
    ANSWER,
    ASK,
    CLARIFY,
    CONFIRM,
    HANDOVER,
    Decision,
)
from r1kit.apps.support.slots import SLOT_WORDS

SYSTEM = {
    "en": "You are a polite customer-service agent of an online shop. Reply in English, in one or two short sentences.",
    "zh": "你是网店的礼貌客服。请用中文回复，一两句话即可。",
}
ANSWERS = {  # what to say to an intent that needs no task
    "greeting": ("greet the customer and ask how you can help", "问候顾客并询问需要什么帮助"),
    "goodbye": ("thank the customer and say goodbye", "感谢顾客并道别"),
    "affirm": ("ask what else you can help with", "询问还有什么可以帮忙"),
    "deny": ("ask what else you can help with", "询问还有什么可以帮忙"),
    "complaint": ("apologise sincerely and promise to help", "真诚道歉并表示会尽力帮忙"),
    "out_of_scope": ("say you can only help with shop orders, products and accounts", "说明只能处理订单、商品和账户问题"),
    "payment_failed": ("suggest checking the card details or trying another payment method", "建议核对银行卡信息或换一种支付方式"),
    "coupon": ("explain that the coupon code goes in the box at checkout", "说明在结账页面输入优惠码"),
    "shipping_cost": ("say standard shipping is free over 50 and 5.99 below", "说明满50包邮，不满收5.99运费"),
}


def instruction(decision: Decision, session: Session, result: ActionResult | None, lang: str) -> str:
    """What the reply must say."""
    zh = lang == "zh"
    state = session.state
    if decision.kind == HANDOVER:
        return "告诉顾客正在为其转接人工客服" if zh else "tell the customer a person from the team will take over now"
    if decision.kind == ASK:
        word = SLOT_WORDS.get(decision.slot, (decision.slot, decision.slot))[1 if zh else 0]
        return f"请顾客提供{word}" if zh else f"ask the customer for their {word}"
    if decision.kind == CONFIRM:
        values = ", ".join(f"{k}: {v}" for k, v in state.task_values().items())
        return f"请顾客确认以下信息是否正确（{decision.intent}）：{values}" if zh else f"ask the customer to confirm these details for {decision.intent}: {values}"
    if decision.kind == ACT and result is not None:
        return (f"告诉顾客：{result.message}" if zh else f"tell the customer: {result.message}") if result.ok else (
            f"抱歉地告诉顾客：{result.message}" if zh else f"apologise and tell the customer: {result.message}")  # fmt: skip
    if decision.kind == CLARIFY:
        return "请顾客换个说法再说明一下需求" if zh else "ask the customer to rephrase what they need"
    if decision.kind == ANSWER and decision.intent in ANSWERS:
        return ANSWERS[decision.intent][1 if zh else 0]
    return "询问顾客还需要什么帮助" if zh else "ask how else you can help"


def messages(decision: Decision, session: Session, result: ActionResult | None, text: str, lang: str, max_turns: int) -> list[dict[str, str]]:
    """The chat the model continues: the system line with the summary and the instruction, the window, the message."""
    system = SYSTEM[lang]
    summary = session.summary_text()
    if summary:
        system += "\n" + summary
    system += "\n" + ("你要做的：" if lang == "zh" else "Your reply must: ") + instruction(decision, session, result, lang)
    chat = [{"role": "system", "content": system}]
    for turn in session.window(max_turns - 1):  # with this message, max_turns turns
        chat += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": turn.reply}]
    return chat + [{"role": "user", "content": text}]
