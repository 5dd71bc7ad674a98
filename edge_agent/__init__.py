"""The edge agent: capture frames, encode, seal to the cloud, sign as the device, publish to Kafka."""
