"""The trainer: mesh and logical rules, optimizer, train state, the jitted step and the loop."""
