"""CPU-only speed-ups, chosen by the platform policy (hsijax.policy); model code never imports
them directly except through that choice."""
