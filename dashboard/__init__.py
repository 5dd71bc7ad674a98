"""The real-time dashboard: reads only Kafka topics and shows every camera and stage live."""
