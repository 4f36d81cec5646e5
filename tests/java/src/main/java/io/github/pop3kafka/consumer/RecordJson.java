package io.github.pop3kafka.consumer;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.apache.avro.generic.GenericRecord;
import org.apache.kafka.common.header.Header;
import org.apache.kafka.common.header.Headers;

/** The JSON line printed for one Kafka record: where it is, how it was framed, what it holds. */
public final class RecordJson {

  public static final String HEADER_RECORD_ID = "pop3kafka.record_id";
  public static final String HEADER_MAILBOX_ID = "pop3kafka.mailbox_id";

  private RecordJson() {}

  /** The fields of a decoded record (without topic, partition, offset and headers). */
  public static Map<String, Object> fields(RecordDecoder.Decoded d) {
    Map<String, Object> out = new LinkedHashMap<>();
    GenericRecord r = d.record();
    out.put("framing", d.framing().label);
    out.put("schema_id", d.schemaId());
    out.put("fingerprint", d.fingerprint());
    out.put("schema", d.writerName());
    out.put("schema_file", d.writerFile());
    out.put("kind", d.kind());
    out.put("record_id", str(field(r, "record_id")));
    Object prov = field(r, "provenance");
    out.put("mailbox_id", prov instanceof GenericRecord p ? str(field(p, "mailbox_id")) : null);
    switch (d.kind()) {
      case "mail" -> {
        out.put("message_id", str(field(r, "message_id")));
        out.put("subject", str(field(r, "subject")));
        List<String> names = new ArrayList<>();
        Object atts = field(r, "attachments");
        if (atts instanceof List<?> list) {
          for (Object a : list) {
            names.add(a instanceof GenericRecord g ? str(field(g, "filename")) : null);
          }
        }
        out.put("attachments", names);
      }
      case "dead_letter" -> {
        out.put("stage", str(field(r, "stage")));
        out.put("reason", str(field(r, "reason")));
      }
      case "chunk" -> {
        out.put("content_id", str(field(r, "content_id")));
        out.put("index", field(r, "index"));
        out.put("count", field(r, "count"));
      }
      default -> {}
    }
    return out;
  }

  /** The value of a Kafka header as UTF-8 (the last one of that name), or null. */
  public static String header(Headers headers, String name) {
    if (headers == null) {
      return null;
    }
    Header h = headers.lastHeader(name);
    return h == null || h.value() == null ? null : new String(h.value(), StandardCharsets.UTF_8);
  }

  static Object field(GenericRecord r, String name) {
    return r.getSchema().getField(name) == null ? null : r.get(name);
  }

  static String str(Object o) {
    return o == null ? null : o.toString();
  }
}
