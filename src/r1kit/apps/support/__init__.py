"""The customer-service assistant (SPEC §5.1): intent recognition, an 8-turn dialogue manager with a
state tracker and policy, plug-in actions over a demo shop, sessions in SQLite, HTTP routes and a chat page.

Modules, bottom to top: ``config`` (settings), ``dataset`` (the shipped bilingual intent set),
``features``/``head``/``zero_shot``/``intent`` (recognising intents), ``slots``/``extraction``/``state``
(what the customer has told us), ``actions`` (the shop), ``policy`` (what to do next), ``dialogue``
(sessions and the model's view of them), ``reply`` (the model's words), ``assistant`` (one turn,
end to end), ``store`` (persistence), ``routes`` (HTTP), ``report`` (evaluation plots).
"""
