"""``robustness.adversarial``: the check and its parts.

``check`` holds the check, ``extra`` its opt-in attacks, ``retrieval`` its retrieval path and
``common`` the pieces they share.
"""
