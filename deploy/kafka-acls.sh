#!/usr/bin/env bash
# Kafka ACLs for labloop on a real cluster (Apache Kafka's kafka-acls.sh, any authorizer that
# speaks the Kafka admin API). One principal per role; each gets only what its clients do:
#   instruments write readings and plates only;
#   robots read requests, and write status and readings (and plates);
#   the worker reads its inputs and writes its outputs;
#   the sink reads everything;
#   nothing but the operator writes labloop.campaigns and labloop.decisions (people's approvals,
#   through `labloop approve` and the dashboard); robots never read labloop.proposals.
# Usage: BOOTSTRAP=broker:9093 ADMIN_CONFIG=admin.properties deploy/kafka-acls.sh
# Principals default to User:<role>; override with INSTRUMENT=User:lims-01 and so on.
# The embedded broker authenticates but does not authorize: these rules are for a real cluster.
set -euo pipefail

BOOTSTRAP="${BOOTSTRAP:?set BOOTSTRAP to the cluster's bootstrap servers}"
ADMIN_CONFIG="${ADMIN_CONFIG:?set ADMIN_CONFIG to a client properties file with an admin's credentials}"
KAFKA_ACLS="${KAFKA_ACLS:-kafka-acls.sh}"
INSTRUMENT="${INSTRUMENT:-User:instrument}"
ROBOT="${ROBOT:-User:robot}"
WORKER="${WORKER:-User:worker}"
SINK="${SINK:-User:sink}"
OPERATOR="${OPERATOR:-User:operator}"
PUBLISHER="${PUBLISHER:-User:publisher}"

T=labloop
acl() {  # acl PRINCIPAL OPERATION TOPIC
  "$KAFKA_ACLS" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add \
    --allow-principal "$1" --operation "$2" --topic "$3"
}
group() {  # group PRINCIPAL GROUP_PREFIX
  "$KAFKA_ACLS" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add \
    --allow-principal "$1" --operation Read --group "$2" --resource-pattern-type prefixed
}

# Instruments (and the LIMS publisher's readings): readings and plates only.
for p in "$INSTRUMENT" "$PUBLISHER"; do
  acl "$p" Write "$T.readings"
  acl "$p" Write "$T.plates"
done
acl "$PUBLISHER" Write "$T.compounds"

# Robots: take requests, report status and their instruments' results.
acl "$ROBOT" Read "$T.requests"
acl "$ROBOT" Write "$T.request-status"
acl "$ROBOT" Write "$T.readings"
acl "$ROBOT" Write "$T.plates"
group "$ROBOT" labloop-robots

# The worker: its inputs and outputs.
for t in campaigns compounds readings plates request-status decisions; do
  acl "$WORKER" Read "$T.$t"
done
for t in proposals requests request-status predictions model-updates dead-letters; do
  acl "$WORKER" Write "$T.$t"
done
group "$WORKER" labloop-worker

# The sink: everything, read-only.
for t in campaigns compounds readings plates predictions proposals decisions requests request-status model-updates \
    dead-letters; do
  acl "$SINK" Read "$T.$t"
done
group "$SINK" labloop-sink

# The operator: campaign definitions (no one else writes them), requeues, and the topics themselves.
acl "$OPERATOR" Write "$T.campaigns"
acl "$OPERATOR" Write "$T.request-status"
acl "$OPERATOR" Write "$T.decisions"
"$KAFKA_ACLS" --bootstrap-server "$BOOTSTRAP" --command-config "$ADMIN_CONFIG" --add \
  --allow-principal "$OPERATOR" --operation Create --operation Describe --operation DescribeConfigs --cluster
