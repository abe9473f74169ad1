# The real Elasticsearch node of the test suite (consumer/tests/elasticsearch_node.py): Elasticsearch's
# minimal distribution (the integ-test zip) from Maven Central, fetched once into ~/.m2 by the machine's
# Maven, at the version pinned as STACK_VERSION in .env. The suite starts the node itself (a Java 21+
# runtime from /usr/lib/jvm or ES_JAVA_HOME); without the zip or Java its tests skip, saying why.
#   make test-elasticsearch   the real-Elasticsearch tier alone

ES_VERSION := $(shell sed -n 's/^STACK_VERSION=//p' .env)
ES_ZIP := $(HOME)/.m2/repository/org/elasticsearch/distribution/integ-test-zip/elasticsearch/$(ES_VERSION)/elasticsearch-$(ES_VERSION).zip

.PHONY: elasticsearch-zip test-elasticsearch

# A failed download does not stop `make test`: the tier then skips by name with Maven's answer.
elasticsearch-zip:
	@[ -f $(ES_ZIP) ] || { \
	  command -v mvn >/dev/null || { $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq maven; }; \
	  echo "fetching Elasticsearch $(ES_VERSION) (integ-test zip) through Maven"; \
	  mvn -q -B dependency:get -Dartifact=org.elasticsearch.distribution.integ-test-zip:elasticsearch:$(ES_VERSION):zip \
	      -Dtransitive=false || echo "WARNING: no Elasticsearch zip; the real-Elasticsearch tests will skip"; }

test-elasticsearch: venv elasticsearch-zip
	$(BIN)/python -m pytest -q -m elasticsearch -rs consumer/tests
