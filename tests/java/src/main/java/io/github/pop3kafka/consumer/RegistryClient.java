package io.github.pop3kafka.consumer;

import com.fasterxml.jackson.databind.JsonNode;
import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.IOException;
import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.nio.charset.StandardCharsets;
import java.time.Duration;
import org.apache.avro.Schema;
import org.apache.avro.SchemaParseException;

/**
 * Looks up writer schemas by id in a Confluent-compatible schema registry: {@code GET
 * {base}/schemas/ids/{id}}, JSON field {@code schema} (and {@code schemaType}, absent for Avro).
 * {@code base} is the registry's Confluent-compatible root, e.g. {@code http://host:8081} for
 * Confluent's, {@code http://host:8080/apis/ccompat/v7} for Apicurio Registry. Plain
 * java.net.http; answers are cached by {@link RecordDecoder}.
 */
public final class RegistryClient implements RecordDecoder.SchemaLookup {

  private static final ObjectMapper JSON = new ObjectMapper();

  private final String base;
  private final HttpClient http;
  private final Duration timeout;

  public RegistryClient(String base, Duration timeout) {
    this.base = base.endsWith("/") ? base.substring(0, base.length() - 1) : base;
    this.timeout = timeout;
    this.http = HttpClient.newBuilder().connectTimeout(timeout).followRedirects(HttpClient.Redirect.NORMAL).build();
  }

  @Override
  public Schema schemaById(int id) throws IOException, RecordDecoder.DecodeException {
    HttpRequest req =
        HttpRequest.newBuilder(URI.create(base + "/schemas/ids/" + Integer.toUnsignedString(id)))
            .timeout(timeout)
            .header("Accept", "application/vnd.schemaregistry.v1+json, application/json")
            .GET()
            .build();
    HttpResponse<String> resp;
    try {
      resp = http.send(req, HttpResponse.BodyHandlers.ofString(StandardCharsets.UTF_8));
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
      throw new IOException("interrupted", e);
    }
    if (resp.statusCode() == 404) {
      throw new RecordDecoder.DecodeException(
          "unknown_schema", "schema id " + id + " is not in the registry at " + base + " (HTTP 404)");
    }
    if (resp.statusCode() != 200) {
      throw new IOException("HTTP " + resp.statusCode() + " from " + req.uri() + ": " + abbreviate(resp.body()));
    }
    JsonNode doc;
    try {
      doc = JSON.readTree(resp.body());
    } catch (IOException e) {
      throw new IOException("the registry answered " + req.uri() + " with invalid JSON: " + e.getMessage(), e);
    }
    String type = doc.path("schemaType").asText("AVRO");
    if (!type.isEmpty() && !type.equalsIgnoreCase("AVRO")) {
      throw new RecordDecoder.DecodeException("not_ours", "schema id " + id + " is a " + type + " schema, not Avro");
    }
    JsonNode schema = doc.get("schema");
    if (schema == null || !schema.isTextual()) {
      throw new IOException("the registry's answer for schema id " + id + " has no \"schema\" string");
    }
    try {
      return new Schema.Parser().parse(schema.asText());
    } catch (SchemaParseException e) {
      throw new RecordDecoder.DecodeException(
          "unknown_schema", "schema id " + id + " is not a valid Avro schema: " + e.getMessage(), e);
    }
  }

  private static String abbreviate(String s) {
    return s.length() <= 200 ? s : s.substring(0, 200) + "...";
  }
}
