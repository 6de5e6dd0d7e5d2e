"""Content-selected attention at run time: `blocks` (MoBA-style routed kv blocks:
`route`, index checks, block masks) and `heads` (MoH-style head routing:
`route_heads`, `gate_heads`)."""
