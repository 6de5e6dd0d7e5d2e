"""Core semantics: what a pattern means, token by token.

`semantics` (the element-wise visibility rule, NATTEN's window rule written once),
`tiles` (tilings and tile grids), `statuses` (empty / partial / full), `tile_eval`
(the rule evaluated on the tokens of tile pairs, in bounded batches) and `oracle`
(the dense boolean mask every kernel, plan and count is tested against).
"""
