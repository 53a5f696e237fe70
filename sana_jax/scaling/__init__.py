"""Inference-time scaling: verifiers that judge generated images, and choosing the best candidates.

`verifiers` (VLM yes/no judge, CLIP/SigLIP similarity, the shapes checker), `learned_verifier` (a small
text-conditioned CNN trained on the shapes domain) and its training data `verifier_data`, `search`
(best-of-N, SANA's knockout tournament) and `evaluation` (accuracy of the selected sample against N).
"""
