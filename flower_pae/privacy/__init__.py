"""Privacy audit of an honest-but-curious server (issue 6).

The modules keep the trust boundary visible in their imports:

- :mod:`~flower_pae.privacy.server_view` rebuilds what the server holds from the wire dumps
  of a run (server side: no device secret, no masking code);
- :mod:`~flower_pae.privacy.attacks` are the attacks on that view (numpy only);
- :mod:`~flower_pae.privacy.public_model` is the attacker's public knowledge: the published
  backbone, its LM head and the public prompt template (no secret, no masking code);
- :mod:`~flower_pae.privacy.evaluator` is the *evaluator's* side, never the attacker's: it
  holds the cohort secret and reloads the task data only to score the attacks;
- :mod:`~flower_pae.privacy.report` runs everything and writes the report.
"""
