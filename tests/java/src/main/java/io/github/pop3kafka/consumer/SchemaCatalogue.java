package io.github.pop3kafka.consumer;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.Collections;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;
import java.util.stream.Stream;
import org.apache.avro.Schema;
import org.apache.avro.SchemaNormalization;

/**
 * The schema files of pop3-kafka: {@code schemas/*.avsc} (the current schema of each record
 * type, used as the reader schema) and {@code schemas/history/*.avsc} (older versions, writer
 * schemas only). Each file is parsed on its own: versions of one type share a full name.
 */
public final class SchemaCatalogue {

  /** One schema file. */
  public record Entry(String file, Schema schema, long fingerprint, boolean current) {
    /** The fingerprint as its 8 bytes appear in a single-object frame (little-endian), in hex. */
    public String fingerprintHex() {
      return fingerprintHex(fingerprint);
    }

    static String fingerprintHex(long fp) {
      StringBuilder sb = new StringBuilder(16);
      for (int i = 0; i < 8; i++) {
        sb.append(String.format(Locale.ROOT, "%02x", (fp >>> (8 * i)) & 0xff));
      }
      return sb.toString();
    }
  }

  private final List<Entry> entries;
  private final Map<Long, Entry> byFingerprint;
  private final Map<String, Entry> current;

  private SchemaCatalogue(List<Entry> entries) {
    this.entries = List.copyOf(entries);
    Map<Long, Entry> fps = new HashMap<>();
    Map<String, Entry> cur = new LinkedHashMap<>();
    for (Entry e : entries) {
      fps.putIfAbsent(e.fingerprint(), e);
      if (e.current()) {
        Entry clash = cur.put(e.schema().getFullName(), e);
        if (clash != null) {
          throw new IllegalArgumentException(
              "two current schemas named " + e.schema().getFullName() + ": " + clash.file() + ", " + e.file());
        }
      }
    }
    this.byFingerprint = Collections.unmodifiableMap(fps);
    this.current = Collections.unmodifiableMap(cur);
  }

  /** Reads {@code dir/*.avsc} and {@code dir/history/*.avsc}. */
  public static SchemaCatalogue load(Path dir) throws IOException {
    if (!Files.isDirectory(dir)) {
      throw new IOException("schema directory " + dir + " does not exist");
    }
    List<Entry> entries = new ArrayList<>();
    addFiles(entries, dir, "", true);
    Path history = dir.resolve("history");
    if (Files.isDirectory(history)) {
      addFiles(entries, history, "history/", false);
    }
    if (entries.isEmpty()) {
      throw new IOException("no *.avsc files in " + dir);
    }
    return new SchemaCatalogue(entries);
  }

  private static void addFiles(List<Entry> out, Path dir, String prefix, boolean current) throws IOException {
    List<Path> files;
    try (Stream<Path> s = Files.list(dir)) {
      files = s.filter(p -> p.getFileName().toString().endsWith(".avsc")).sorted().toList();
    }
    for (Path p : files) {
      Schema schema;
      try {
        schema = new Schema.Parser().parse(p.toFile());
      } catch (RuntimeException e) {
        throw new IOException("cannot parse " + p + ": " + e.getMessage(), e);
      }
      long fp = SchemaNormalization.parsingFingerprint64(schema);
      out.add(new Entry(prefix + p.getFileName(), schema, fp, current));
    }
  }

  public List<Entry> entries() {
    return entries;
  }

  /** The file whose schema has this CRC-64-AVRO fingerprint, or null. */
  public Entry byFingerprint(long fingerprint) {
    return byFingerprint.get(fingerprint);
  }

  /** The schema file in schemas/ (not history/) of this full name, or null. */
  public Entry current(String fullName) {
    return current.get(fullName);
  }

  /** Every schema file of a full name, current and history. */
  public List<Schema> versionsOf(String fullName) {
    return entries.stream().filter(e -> e.schema().getFullName().equals(fullName)).map(Entry::schema).toList();
  }

  /** The file of a schema equal in Parsing Canonical Form to {@code schema}, or null. */
  public Entry byCanonicalForm(Schema schema) {
    return byFingerprint.get(SchemaNormalization.parsingFingerprint64(schema));
  }

  public Map<String, Entry> currentSchemas() {
    return current;
  }
}
