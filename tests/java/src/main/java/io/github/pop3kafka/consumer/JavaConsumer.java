package io.github.pop3kafka.consumer;

import com.fasterxml.jackson.databind.ObjectMapper;
import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.Comparator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import org.apache.kafka.clients.consumer.ConsumerConfig;
import org.apache.kafka.clients.consumer.ConsumerRecord;
import org.apache.kafka.clients.consumer.ConsumerRecords;
import org.apache.kafka.clients.consumer.KafkaConsumer;
import org.apache.kafka.common.KafkaException;
import org.apache.kafka.common.PartitionInfo;
import org.apache.kafka.common.TopicPartition;
import org.apache.kafka.common.serialization.ByteArrayDeserializer;

/**
 * Reads pop3-kafka topics from the beginning and prints one JSON line per record on stdout.
 *
 * <p>A decoded record: {@code {"topic", "partition", "offset", "framing", "schema_id",
 * "fingerprint", "schema", "schema_file", "kind", "record_id", "header_record_id", "mailbox_id",
 * "header_mailbox_id", ...}} plus {@code message_id, subject, attachments} (file names) for mail,
 * {@code stage, reason} for dead letters, {@code content_id, index, count} for chunks. A value
 * that cannot be decoded: {@code {"topic", "partition", "offset", "header_record_id", "error":
 * code, "message"}} (see {@link RecordDecoder.DecodeException}); the consumer goes on with the
 * next record. The last line on stderr is a JSON summary.
 *
 * <p>Exit status: 0 when every record decoded, 1 when some did not, 2 on a usage error, 3 when
 * Kafka or the schema files failed.
 */
public final class JavaConsumer {

  static final String USAGE =
      """
      usage: JavaConsumer --bootstrap HOST:PORT --topic T [--topic T2 ...] [options]
        --isolation LEVEL      read_committed (the default here; the Java client's own default is
                               read_uncommitted, which also returns records of aborted transactions)
                               or read_uncommitted; "default" leaves isolation.level unset
        --schemas DIR          pop3-kafka's schemas/ (with history/); default ./schemas
        --registry URL         Confluent-compatible schema registry root, for schema-registry frames
        --max-records N        stop after N records (decoded or not)
        --until-end            stop once every partition is read up to its end as of the start
                               (the last stable offset under read_committed)
        --idle-ms MS           stop after MS without a record (default 10000)
        --timeout-ms MS        stop after MS in all (default 120000)
        --property K=V         any other consumer property (security settings...), repeatable
        --list-schemas         print the schema files and their fingerprints, then exit
      """;

  private static final ObjectMapper JSON = new ObjectMapper();

  static final class Options {
    String bootstrap;
    final List<String> topics = new ArrayList<>();
    String isolation = "read_committed";
    Path schemas = Path.of("schemas");
    String registry;
    long maxRecords = Long.MAX_VALUE;
    boolean untilEnd;
    long idleMs = 10_000;
    long timeoutMs = 120_000;
    final Map<String, String> properties = new LinkedHashMap<>();
    boolean listSchemas;

    static Options parse(String[] args) {
      Options o = new Options();
      for (int i = 0; i < args.length; i++) {
        String a = args[i];
        switch (a) {
          case "--bootstrap" -> o.bootstrap = value(args, ++i, a);
          case "--topic" -> o.topics.add(value(args, ++i, a));
          case "--isolation" -> {
            o.isolation = value(args, ++i, a);
            if (!List.of("read_committed", "read_uncommitted", "default").contains(o.isolation)) {
              throw new IllegalArgumentException("--isolation must be read_committed, read_uncommitted or default");
            }
          }
          case "--schemas" -> o.schemas = Path.of(value(args, ++i, a));
          case "--registry" -> o.registry = value(args, ++i, a);
          case "--max-records" -> o.maxRecords = positive(value(args, ++i, a), a);
          case "--until-end" -> o.untilEnd = true;
          case "--idle-ms" -> o.idleMs = positive(value(args, ++i, a), a);
          case "--timeout-ms" -> o.timeoutMs = positive(value(args, ++i, a), a);
          case "--property" -> {
            String kv = value(args, ++i, a);
            int eq = kv.indexOf('=');
            if (eq <= 0) {
              throw new IllegalArgumentException("--property wants KEY=VALUE, got " + kv);
            }
            o.properties.put(kv.substring(0, eq), kv.substring(eq + 1));
          }
          case "--list-schemas" -> o.listSchemas = true;
          case "-h", "--help" -> throw new IllegalArgumentException("");
          default -> throw new IllegalArgumentException("unknown argument " + a);
        }
      }
      if (!o.listSchemas && (o.bootstrap == null || o.topics.isEmpty())) {
        throw new IllegalArgumentException("--bootstrap and at least one --topic are required");
      }
      return o;
    }

    private static String value(String[] args, int i, String flag) {
      if (i >= args.length) {
        throw new IllegalArgumentException(flag + " needs a value");
      }
      return args[i];
    }

    private static long positive(String s, String flag) {
      long v;
      try {
        v = Long.parseLong(s);
      } catch (NumberFormatException e) {
        throw new IllegalArgumentException(flag + " wants a number, got " + s);
      }
      if (v <= 0) {
        throw new IllegalArgumentException(flag + " must be positive");
      }
      return v;
    }
  }

  private final Options opts;
  private final PrintStream out;
  private final PrintStream err;

  JavaConsumer(Options opts, PrintStream out, PrintStream err) {
    this.opts = opts;
    this.out = out;
    this.err = err;
  }

  public static void main(String[] args) {
    PrintStream out = new PrintStream(new FileOutputStream(FileDescriptor.out), true, StandardCharsets.UTF_8);
    PrintStream err = new PrintStream(new FileOutputStream(FileDescriptor.err), true, StandardCharsets.UTF_8);
    Options opts;
    try {
      opts = Options.parse(args);
    } catch (IllegalArgumentException e) {
      if (!e.getMessage().isEmpty()) {
        err.println("error: " + e.getMessage());
      }
      err.print(USAGE);
      System.exit(2);
      return;
    }
    System.exit(new JavaConsumer(opts, out, err).run());
  }

  int run() {
    SchemaCatalogue catalogue;
    try {
      catalogue = SchemaCatalogue.load(opts.schemas);
    } catch (IOException e) {
      err.println("error: " + e.getMessage());
      return 3;
    }
    if (opts.listSchemas) {
      for (SchemaCatalogue.Entry e : catalogue.entries()) {
        Map<String, Object> line = new LinkedHashMap<>();
        line.put("file", e.file());
        line.put("schema", e.schema().getFullName());
        line.put("fingerprint", e.fingerprintHex());
        line.put("current", e.current());
        print(line);
      }
      return 0;
    }
    RecordDecoder.SchemaLookup registry =
        opts.registry == null ? null : new RegistryClient(opts.registry, Duration.ofSeconds(10));
    RecordDecoder decoder = new RecordDecoder(catalogue, registry);

    Properties props = new Properties();
    props.put(ConsumerConfig.BOOTSTRAP_SERVERS_CONFIG, opts.bootstrap);
    // Stated explicitly: the Java client's default is read_uncommitted.
    if (!opts.isolation.equals("default")) {
      props.put(ConsumerConfig.ISOLATION_LEVEL_CONFIG, opts.isolation);
    }
    props.put(ConsumerConfig.ENABLE_AUTO_COMMIT_CONFIG, "false");
    props.put(ConsumerConfig.AUTO_OFFSET_RESET_CONFIG, "earliest");
    props.put(ConsumerConfig.ALLOW_AUTO_CREATE_TOPICS_CONFIG, "false"); // waiting for a topic must not create it
    props.put(ConsumerConfig.CLIENT_ID_CONFIG, "pop3kafka-java-consumer");
    props.put(ConsumerConfig.KEY_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    props.put(ConsumerConfig.VALUE_DESERIALIZER_CLASS_CONFIG, ByteArrayDeserializer.class.getName());
    props.putAll(opts.properties);

    long start = System.nanoTime();
    long deadline = start + opts.timeoutMs * 1_000_000L;
    long records = 0;
    long errors = 0;
    String stopped;
    try (KafkaConsumer<byte[], byte[]> consumer = new KafkaConsumer<>(props)) {
      List<TopicPartition> parts = partitions(consumer, deadline);
      if (parts == null) {
        summary(records, errors, "timeout", "topics not found: " + opts.topics, start);
        return 3;
      }
      consumer.assign(parts);
      consumer.seekToBeginning(parts);
      Map<TopicPartition, Long> end = null;
      if (opts.untilEnd) {
        end = consumer.endOffsets(parts, Duration.ofNanos(Math.max(1, deadline - System.nanoTime())));
      }
      long lastRecord = System.nanoTime();
      while (true) {
        if (records >= opts.maxRecords) {
          stopped = "max_records";
          break;
        }
        if (end != null && reachedEnd(consumer, end)) {
          stopped = "end";
          break;
        }
        long now = System.nanoTime();
        if (now >= deadline) {
          stopped = "timeout";
          break;
        }
        if (now - lastRecord >= opts.idleMs * 1_000_000L) {
          stopped = "idle";
          break;
        }
        ConsumerRecords<byte[], byte[]> batch = consumer.poll(Duration.ofMillis(200));
        for (ConsumerRecord<byte[], byte[]> rec : batch) {
          lastRecord = System.nanoTime();
          if (records >= opts.maxRecords) {
            break;
          }
          records++;
          if (!emit(decoder, rec)) {
            errors++;
          }
        }
      }
    } catch (KafkaException e) {
      summary(records, errors, "kafka_error", e.toString(), start);
      return 3;
    }
    summary(records, errors, stopped, null, start);
    return errors == 0 ? 0 : 1;
  }

  /** Every partition of every topic; waits for topics that do not exist yet. Null on timeout. */
  private List<TopicPartition> partitions(KafkaConsumer<byte[], byte[]> consumer, long deadline) {
    List<TopicPartition> parts = new ArrayList<>();
    for (String topic : opts.topics) {
      List<PartitionInfo> infos = List.of();
      while (infos.isEmpty()) {
        long left = deadline - System.nanoTime();
        if (left <= 0) {
          return null;
        }
        infos = consumer.partitionsFor(topic, Duration.ofNanos(Math.min(left, 5_000_000_000L)));
        if (infos == null) {
          infos = List.of();
        }
        if (infos.isEmpty()) {
          sleep(200);
        }
      }
      infos.stream()
          .map(p -> new TopicPartition(p.topic(), p.partition()))
          .sorted(Comparator.comparingInt(TopicPartition::partition))
          .forEach(parts::add);
    }
    return parts;
  }

  private static boolean reachedEnd(KafkaConsumer<byte[], byte[]> consumer, Map<TopicPartition, Long> end) {
    for (Map.Entry<TopicPartition, Long> e : end.entrySet()) {
      if (consumer.position(e.getKey(), Duration.ofSeconds(10)) < e.getValue()) {
        return false;
      }
    }
    return true;
  }

  private boolean emit(RecordDecoder decoder, ConsumerRecord<byte[], byte[]> rec) {
    Map<String, Object> line = new LinkedHashMap<>();
    line.put("topic", rec.topic());
    line.put("partition", rec.partition());
    line.put("offset", rec.offset());
    line.put("header_record_id", RecordJson.header(rec.headers(), RecordJson.HEADER_RECORD_ID));
    line.put("header_mailbox_id", RecordJson.header(rec.headers(), RecordJson.HEADER_MAILBOX_ID));
    boolean ok;
    try {
      line.putAll(RecordJson.fields(decoder.decode(rec.value())));
      ok = true;
    } catch (RecordDecoder.DecodeException e) {
      line.put("error", e.code);
      line.put("message", e.getMessage());
      ok = false;
    }
    print(line);
    return ok;
  }

  private void summary(long records, long errors, String stopped, String message, long start) {
    Map<String, Object> line = new LinkedHashMap<>();
    line.put("summary", true);
    line.put("records", records);
    line.put("errors", errors);
    line.put("stopped", stopped);
    line.put("isolation_level", opts.isolation.equals("default") ? "unset (the client default)" : opts.isolation);
    line.put("seconds", (System.nanoTime() - start) / 1e9);
    if (message != null) {
      line.put("message", message);
    }
    try {
      err.println(JSON.writeValueAsString(line));
    } catch (IOException e) {
      err.println("{\"summary\": true, \"stopped\": \"" + stopped + "\"}");
    }
  }

  private void print(Map<String, Object> line) {
    try {
      out.println(JSON.writeValueAsString(line));
    } catch (IOException e) { // a map of strings, numbers and lists always serialises
      throw new IllegalStateException(e);
    }
  }

  private static void sleep(long ms) {
    try {
      Thread.sleep(ms);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
  }
}
