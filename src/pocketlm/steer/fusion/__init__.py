"""How a token is chosen: the fusion math (formulas), rule objects (rules), named methods (methods), and the
guards that refuse tokens after any rule (guards, leak_guard) with the leakage measure they share (leakage)."""
