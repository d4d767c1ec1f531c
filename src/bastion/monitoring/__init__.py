"""Model monitoring: per-version model metrics, drift against each version's reference sample
(workers count live inputs and outputs into bins, the control plane judges), feedback labels
and live accuracy (``bastion.monitoring.feedback``)."""
